"""The `kiln` command as users run it: a real subprocess per call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import SUBCOMMANDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
from test_loader import write_corpus  # noqa: E402 (a corpus writer shared with tests/pretrain)

KILN = shutil.which("kiln", path=str(Path(sys.executable).parent)) or "kiln"


def kiln(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [KILN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_help_lists_every_subcommand_with_one_line() -> None:
    result = kiln("--help")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for name in ("data", "train", "launch", "plan", "export", "report"):
        [line] = [line for line in lines if line.startswith(f"  {name} ")]
        assert len(line.split(maxsplit=1)[1]) > 20
    assert kiln().returncode == 2
    bad = kiln("bake")
    assert bad.returncode == 2 and "unknown subcommand 'bake'" in bad.stderr


def test_every_subcommand_has_a_handler() -> None:
    assert all(sub.handler for sub in SUBCOMMANDS.values())


def test_plan_table_for_llama_8b_on_64_gpus(tmp_path: Path) -> None:
    result = kiln(
        "plan", "model=llama_8b", "cluster.nodes=8", "cluster.gpus_per_node=8", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "8.03B (8,030,261,248)" in out
    assert "8 node(s) x 8 H100-SXM = 64 ranks" in out
    assert "161B tokens (20/param)" in out
    for strategy in ("zero0", "zero1", "zero2", "zero3", "fsdp"):
        assert f"│ {strategy}" in out
    assert "days" in out and "GPU-hours" in out
    assert list(tmp_path.iterdir()) == []  # a plan writes nothing


def test_plan_json_carries_the_same_figures(tmp_path: Path) -> None:
    args = ("plan", "model=llama_8b", "cluster.nodes=8", "cluster.gpus_per_node=8")
    result = kiln(*args, "plan.format=json", f"plan.output={tmp_path}/plan.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan == json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"]["params_total"] == 8_030_261_248
    assert plan["scaling"]["chinchilla_tokens"] == pytest.approx(20 * 8_030_261_248)
    assert set(plan["memory"]) == {"zero0", "zero1", "zero2", "zero3", "fsdp"}
    for figures in plan["memory"].values():
        assert (
            figures["total"]
            == figures["model_states"] + figures["buffers"] + figures["activations"]
        )
    assert plan["training"]["days"] == pytest.approx(plan["training"]["seconds"] / 86400)
    # The table shows the JSON's numbers.
    table = kiln(*args, cwd=tmp_path).stdout
    zero3 = plan["memory"]["zero3"]
    assert f"{zero3['total_checkpointed'] / 2**30:.2f}" in table


def test_misspelled_key_fails_naming_the_key(tmp_path: Path) -> None:
    result = kiln("plan", "model.d_modle=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "d_modle" in result.stderr and "DecoderConfig" in result.stderr
    assert result.stdout == ""


def test_unknown_option_fails_naming_the_option(tmp_path: Path) -> None:
    result = kiln("plan", "model=nonexistent", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/nonexistent'" in result.stderr
    assert "llama_8b" in result.stderr  # the available options are listed


def test_wrong_type_and_semantic_errors_fail_before_anything_runs(tmp_path: Path) -> None:
    result = kiln("train", "data.seq_len=long", cwd=tmp_path)
    assert result.returncode == 1 and "data.seq_len" in result.stderr
    result = kiln("train", "model=bert_base", cwd=tmp_path)  # validated before "not built yet"
    assert result.returncode == 1
    assert "config error: objective=clm trains decoder models" in result.stderr


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    result = kiln("train", "experiment=demo", "engine=zero3", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "zero_stage: 3" in result.stdout and "experiment_name: demo" in result.stdout


def test_subcommand_help_lists_config_groups(tmp_path: Path) -> None:
    result = kiln("plan", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "kiln plan:" in result.stdout
    for group in ("model:", "engine:", "cluster:", "experiment:"):
        assert group in result.stdout


def test_multirun_sweeps_plan_over_models(tmp_path: Path) -> None:
    result = kiln(
        "plan", "-m", "model=gpt2_124m,gpt2_350m", "plan.format=json",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    text, plans = result.stdout, []
    while text.strip():
        text = text[text.index("{") :]
        plan, end = decoder.raw_decode(text)
        plans.append(plan)
        text = text[end:]
    assert [p["model"]["name"] for p in plans] == ["gpt2_124m", "gpt2_350m"]
    assert plans[0]["model"]["params_total"] < plans[1]["model"]["params_total"]


# What a process that only plans, or only starts the ranks, runs: it must not import torch
# (2 s or more per call; `kiln train` at 2+ ranks paid it before torchrun could start).
NO_TORCH_PROBE = """
import atexit, subprocess, sys
from launch.cli import main

def report(command=None):
    print("PROBE", "torch" in sys.modules, command, file=sys.stderr, flush=True)

class Started:  # stands in for torchrun's process: what matters is the state before it
    def __init__(self, command, **kwargs):
        report(command)
    def wait(self):
        return 0
    def send_signal(self, signum):
        pass

subprocess.Popen = Started
atexit.register(report)
sys.argv = ["kiln", *sys.argv[1:]]
main()
"""


def probe(cwd: Path, *args: str, code: int = 0) -> tuple[list[str], str]:
    """`kiln ARGS` with NO_TORCH_PROBE: the PROBE lines, and stderr without them."""
    result = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    rest = "\n".join(line for line in lines if not line.startswith("PROBE"))
    return [line for line in lines if line.startswith("PROBE")], rest


def test_plan_and_the_launching_process_of_train_do_not_import_torch(tmp_path: Path) -> None:
    write_corpus(tmp_path / "shards", {"web": [20]}, {"web": 1.0})
    plan, _ = probe(tmp_path, "plan", "model=llama_8b", "cluster.nodes=8")
    assert plan == ["PROBE False None"]
    train, _ = probe(tmp_path, "train", "model=tiny_decoder", "cluster=local_cpu",
                     "cluster.gpus_per_node=2", f"trainer.run_dir={tmp_path}/run", "logger=none",
                     f"data.path={tmp_path}/shards")  # fmt: skip
    [started, at_exit] = train
    assert started.startswith("PROBE False [") and "'pretrain.torchrun'" in started
    assert "'--nproc_per_node=2'" in started and "'pretrain.train'" in started
    assert at_exit == "PROBE False None"
    assert (tmp_path / "run" / "config.pkl").is_file()
    # `kiln launch` writing a Slurm job (the trainer's requeue status in it) imports no torch
    launch, _ = probe(tmp_path, "launch", "cluster=slurm", "cluster.dry_run=true",
                      "model=tiny_decoder", "logger=none", f"trainer.run_dir={tmp_path}/job")  # fmt: skip
    assert launch == ["PROBE False None"]
    assert "KILN_REQUEUE_STATUS=42\n" in (tmp_path / "job" / "slurm" / "job.sbatch").read_text()


def test_train_says_what_stops_every_rank_before_starting_one(tmp_path: Path) -> None:
    """The shards' manifest and an explicit resume checkpoint are checked in the launching
    process: one line each, no traceback, no run directory, and torchrun never starts."""
    write_corpus(tmp_path / "shards", {"web": [20]}, {"web": 1.0})
    base = ["train", "model=tiny_decoder", "cluster=local_cpu", "cluster.gpus_per_node=2",
            f"trainer.run_dir={tmp_path}/run", "logger=none"]  # fmt: skip
    cases = {
        "data.path=missing": "kiln train: missing/manifest.json: no manifest (run "
        "`kiln data output_dir=missing` first)",
        "model.vocab_size=64": "kiln train: model.vocab_size=64 is smaller than the tokenizer "
        f"of {tmp_path}/shards (1000 pieces); set model.vocab_size >= 1000",
        "+data.mixture={books: 1.0}": "kiln train: data.mixture names unknown source(s) "
        f"['books']; {tmp_path}/shards has ['web']",
        f"trainer.resume={tmp_path}": f"kiln train: trainer.resume={tmp_path}: not a "
        "checkpoint directory (no trainer.json there)",
    }
    for override, message in cases.items():
        data = [] if override.startswith("data.path") else [f"data.path={tmp_path}/shards"]
        probes, stderr = probe(tmp_path, *base, *data, override, code=1)
        assert probes == ["PROBE False None"], override  # nothing started, torch not imported
        assert stderr.strip() == message, override
        assert not (tmp_path / "run").exists()
    # both problems at once: both said
    probes, stderr = probe(tmp_path, *base, "data.path=missing", f"trainer.resume={tmp_path}",
                           code=1)  # fmt: skip
    assert (
        stderr.count("kiln train: ") == 2 and "no manifest" in stderr and "trainer.json" in stderr
    )
