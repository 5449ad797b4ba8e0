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


def test_plan_and_the_launching_process_of_train_do_not_import_torch(tmp_path: Path) -> None:
    def probe(*args: str) -> list[str]:
        result = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return [line for line in result.stderr.splitlines() if line.startswith("PROBE")]

    plan = probe("plan", "model=llama_8b", "cluster.nodes=8")
    assert plan == ["PROBE False None"]
    train = probe("train", "model=tiny_decoder", "cluster=local_cpu", "cluster.gpus_per_node=2",
                  f"trainer.run_dir={tmp_path}/run", "logger=none")  # fmt: skip
    [started, at_exit] = train
    assert started.startswith("PROBE False [") and "'torch.distributed.run'" in started
    assert "'--nproc_per_node=2'" in started and "'pretrain.train'" in started
    assert at_exit == "PROBE False None"
    assert (tmp_path / "run" / "config.pkl").is_file()
