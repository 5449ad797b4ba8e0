"""The `kiln` command as users run it: a real subprocess per call."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
    for strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp"):
        assert f"│ {strategy}" in out
    assert "│ ddp *    │" in out and "│ fsdp     │" in out  # the default engine, ddp: marked
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
    assert plan["cluster"]["strategy"] == "zero0"  # the row of this config's engine (ddp)
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
    """Hydra's message (which suggests `+model.d_modle=3`) becomes kiln's line with the closest
    settings, as for a misspelled `+key`; other composition errors pass through."""
    result = kiln("plan", "model.d_modle=3", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("kiln plan: config error: model.d_modle is not a setting of kiln "
                             "(did you mean model.d_model or model.moe?)\n")  # fmt: skip
    result = kiln("plan", "cluster=slurm", "cluster.partiton=gpu", cwd=tmp_path)
    assert result.stderr == ("kiln plan: config error: cluster.partiton is not a setting of "
                             "kiln (did you mean cluster.partition?)\n")  # fmt: skip
    result = kiln("plan", "cluster.nodes=1,2", cwd=tmp_path)  # a sweep without -m
    assert result.returncode == 1 and "Ambiguous value for argument 'cluster.nodes=1,2'" in (
        result.stderr
    )
    assert "kiln plan: config error" not in result.stderr  # Hydra's own message, as it is


def test_a_misspelled_group_is_suggested_as_the_group(tmp_path: Path) -> None:
    """The top level's suggestions are its settings and the config groups (experiment is a
    group, not a setting); a group one of whose options is the value given comes alone."""
    for name, typed, meant in (("train", "experiement=demo", "experiment"),
                               ("plan", "engin=ddp", "engine"),
                               ("plan", "+experiement=demo", "experiment")):  # fmt: skip
        result = kiln(name, typed, cwd=tmp_path)
        key = typed.lstrip("+").split("=")[0]
        assert (result.returncode, result.stderr) == (
            1, f"kiln {name}: config error: {key} is not a setting of kiln (did you mean {meant}?)\n"
        ), typed  # fmt: skip
    result = kiln("plan", "experiement=nothing_of_its", cwd=tmp_path)
    assert result.stderr == ("kiln plan: config error: experiement is not a setting of kiln "
                             "(did you mean experiment or experiment_name?)\n")  # fmt: skip


def test_unknown_option_fails_naming_the_option(tmp_path: Path) -> None:
    """`group=option` naming no preset: one line with the group's options and the closest."""
    engines = "ddp, fsdp, hsdp, zero1, zero2, zero2_offload, zero3, zero3_offload"
    experiments = "bert_mlm, demo, gpt2_124m, llama_8b_fsdp, long_context, t5_span"
    models = ("bert_base, gpt2_124m, gpt2_350m, llama_1b, llama_8b, mixtral_8x7b, olmoe_1b_7b, "
              "t5_base, tiny_decoder, tiny_encoder, tiny_encoder_decoder, tiny_gpt2, tiny_moe, "
              "tiny_moe_encoder, tiny_moe_t5")  # fmt: skip
    cases = {
        ("train", "engine=zero4"): "kiln train: config error: engine=zero4 is not an option of "
        f"engine (options: {engines}); did you mean zero3?",
        ("train", "experiment=gpt2"): "kiln train: config error: experiment=gpt2 is not an "
        f"option of experiment (options: {experiments}); did you mean gpt2_124m?",
        ("plan", "model=nonexistent"): "kiln plan: config error: model=nonexistent is not an "
        f"option of model (options: {models})",
    }
    for args, message in cases.items():
        result = kiln(*args, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message + "\n")
    assert list(tmp_path.iterdir()) == []


def test_a_value_of_the_wrong_type_says_what_the_key_takes(tmp_path: Path) -> None:
    """Hydra's and OmegaConf's messages (reference_type=OptimConfig ...) become one line: the
    override, what its key takes, and for a list or a map entry the override to write."""
    cases = {
        ("train", "optim.lr=abc"): "kiln train: config error: optim.lr=abc: optim.lr takes a "
        "float, not 'abc'",
        ("plan", "data.seq_len=long"): "kiln plan: config error: data.seq_len=long: "
        "data.seq_len takes an integer, not 'long'",
        ("plan", "plan.tokens=many"): "kiln plan: config error: plan.tokens=many: plan.tokens "
        "takes a float or null, not 'many'",
        ("plan", "trainer=3"): "kiln plan: config error: trainer=3: trainer takes settings "
        "(trainer.NAME=VALUE), not '3'",
        ("data", "corpus=files", "corpus.sources.0.paths=/my/dir"): "kiln data: config error: "
        "corpus.sources.0.paths=/my/dir: corpus.sources.0.paths takes a list, not '/my/dir'; "
        "write corpus.sources.0.paths=[/my/dir]",
        ("train", "data.mixture.foo=1"): "kiln train: config error: data.mixture.foo=1: "
        "data.mixture has no entry foo, and a new entry of a map is added with +; write "
        "+data.mixture.foo=1",
    }
    for args, message in cases.items():
        result = kiln(*args, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message + "\n")
    assert list(tmp_path.iterdir()) == []


def test_semantic_errors_fail_before_anything_runs(tmp_path: Path) -> None:
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
    groups = dict(
        line.split(": ", 1) for line in result.stdout.split("== Configuration groups ==")[1]
        .split("== Config ==")[0].splitlines() if ": " in line
    )  # fmt: skip
    assert "gpt2_124m" in groups["model"].split(", ")
    assert "zero3" in groups["engine"].split(", ") and "slurm" in groups["cluster"].split(", ")
    assert "demo" in groups["experiment"].split(", ")
    # the typed schemas the presets extend are not options to pick
    assert not [group for group in groups if group.startswith("schema")], groups
    assert list(groups) == ["cluster", "corpus", "data", "engine", "experiment", "filters",
                            "logger", "model", "objective", "optim"]  # fmt: skip
    # the config shown is the one the overrides compose; one that does not is kiln's line
    result = kiln("train", "model=llama_8b", "-h", cwd=tmp_path)
    assert result.returncode == 0 and "  name: llama_8b\n" in result.stdout
    result = kiln("train", "engine=zero4", "--help", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("kiln train: config error: engine=zero4 is not an option")
    assert list(tmp_path.iterdir()) == []


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


def test_a_sweep_leaves_only_hydras_record_of_it(tmp_path: Path) -> None:
    """Hydra's multirun.yaml, and no empty per-point folder beside it (a point writes where
    kiln puts it: RUN_DIR/sweep-N, OUTPUT_DIR/sweep-N, or nowhere for a plan)."""
    result = kiln("plan", "-m", "optim.lr=1e-3,3e-4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("kiln plan: tiny_decoder") == 2
    [record] = [path for path in tmp_path.rglob("*") if not path.is_dir()]
    assert record.parent.parent == tmp_path / "runs" / "plan" / "multirun"
    assert record.name == "multirun.yaml"
    folders = sorted(path for path in tmp_path.rglob("*") if path.is_dir())
    assert folders == [record.parents[3], record.parents[2], record.parents[1], record.parent]


# What a process that only plans, or only starts the ranks, runs: it must not import torch
# (2 s or more per call; `kiln train` at 2+ ranks paid it before torchrun could start).
NO_TORCH_PROBE = """
import atexit, json, os, subprocess, sys
from launch.cli import main

def report(command=None):
    print("PROBE", "torch" in sys.modules, command, file=sys.stderr, flush=True)

class Started:  # stands in for torchrun's process: what matters is the state before it
    def __init__(self, command, pass_fds=(), **kwargs):
        report(command)
        # the warm agent's end of the pipe its torchrun arguments come down
        self.fds = [os.dup(fd) for fd in pass_fds]
    def wait(self):
        for fd in self.fds:  # what the agent was sent: torchrun's arguments, the config of
            with os.fdopen(fd, "rb") as pipe:  # the one rank it trains, or nothing
                data = pipe.read()
            request = json.loads(data) if data else {}
            report(request.get("argv") or request.get("rank") or "nothing")
        self.fds = []
        return 0
    def kill(self):
        pass
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
    # FP8's check finds torchao without importing it (torchao imports torch)
    plan, _ = probe(tmp_path, "plan", "model=llama_8b", "engine=fsdp", "engine.float8=true")
    assert plan == ["PROBE False None"]
    train, _ = probe(tmp_path, "train", "model=tiny_decoder", "cluster=local_cpu",
                     "cluster.gpus_per_node=2", f"trainer.run_dir={tmp_path}/run", "logger=none",
                     f"data.path={tmp_path}/shards")  # fmt: skip
    # the warm agent starts before the config is composed, and is then sent torchrun's
    # arguments (its environment and directory beside them)
    [agent, started, at_exit] = train
    assert agent.startswith("PROBE False [") and "'pretrain.torchrun', '--args-fd'" in agent
    assert started.startswith("PROBE False ['--nproc_per_node=2'")
    assert "'pretrain.train'" in started and f"{tmp_path}/run/config.pkl" in started
    assert at_exit == "PROBE False None"
    assert (tmp_path / "run" / "config.pkl").is_file()
    # one rank: the agent trains it (`python -m pretrain.train CONFIG` there)
    one, _ = probe(tmp_path, "train", "model=tiny_decoder", "cluster=local_cpu",
                   "cluster.gpus_per_node=1", f"trainer.run_dir={tmp_path}/one", "logger=none",
                   f"data.path={tmp_path}/shards")  # fmt: skip
    assert one[1:] == [f"PROBE False {tmp_path}/one/config.pkl", "PROBE False None"], one
    # `kiln launch` writing a Slurm job (the trainer's requeue status in it) imports no torch
    launch, _ = probe(tmp_path, "launch", "cluster=slurm", "cluster.dry_run=true",
                      "model=tiny_decoder", "logger=none", f"trainer.run_dir={tmp_path}/job",
                      f"data.path={tmp_path}/shards")  # fmt: skip
    assert launch == ["PROBE False None"]
    assert "KILN_REQUEUE_STATUS=42\n" in (tmp_path / "job" / "slurm" / "job.sbatch").read_text()


def test_a_path_a_command_cannot_write_is_one_line(tmp_path: Path) -> None:
    """An OSError out of a subcommand (here plan.output naming a directory) is its message,
    which names the path, with no traceback and nothing half-written left behind."""
    taken = tmp_path / "plan.json"
    taken.mkdir()
    _, stderr = probe(tmp_path, "plan", f"plan.output={taken}", code=1)
    assert stderr.strip() == (f"kiln plan: [Errno 21] Is a directory: '{taken}.tmp' -> '{taken}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


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
        # nothing started but the warm agent, which was sent nothing; torch not imported
        assert probes[0].startswith("PROBE False [") and "'--args-fd'" in probes[0], override
        assert probes[1:] == ["PROBE False nothing", "PROBE False None"], override
        assert stderr.strip() == message, override
        assert not (tmp_path / "run").exists()
    # data.path one level too deep (the manifest itself, the shards/ directory in the output)
    for inside in ("shards/manifest.json", "shards/shards"):
        _, stderr = probe(tmp_path, *base, f"data.path={tmp_path}/{inside}", code=1)
        assert stderr.strip() == (
            f"kiln train: data.path={tmp_path}/{inside}: data.path is the kiln data output "
            f"directory (the one holding manifest.json): use data.path={tmp_path}/shards"
        )
    # no shards yet: the `kiln data` command to run keeps the experiment (its tokenizer)
    _, stderr = probe(tmp_path, *base, "experiment=demo", code=1)
    assert stderr.strip() == ("kiln train: out/demo/data/manifest.json: no manifest (run `kiln "
                              "data experiment=demo` first)")  # fmt: skip
    # both problems at once: both said
    probes, stderr = probe(tmp_path, *base, "data.path=missing", f"trainer.resume={tmp_path}",
                           code=1)  # fmt: skip
    assert (
        stderr.count("kiln train: ") == 2 and "no manifest" in stderr and "trainer.json" in stderr
    )
    # a tokenizer changed since the shards were built (it would fail at the run's end)
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "shards", changed)
    (changed / "tokenizer.model").write_bytes(b"not a SentencePiece model")
    _, stderr = probe(tmp_path, *base, f"data.path={changed}", code=1)
    assert stderr.strip() == (
        f"kiln train: {changed}/tokenizer.model: sha256 differs from the manifest (the tokenizer "
        f"changed since the shards were built); restore it, or rebuild with `kiln data "
        f"output_dir={changed} overwrite=true`"
    )


RANK_SCRIPT = """
import os
print("rank", os.environ["RANK"], os.environ["KILN_AGENT_PROBE"], os.getcwd(), flush=True)
"""


def start_warm_agent() -> tuple[subprocess.Popen[str], int]:
    """`python -m pretrain.torchrun --args-fd N`, as `kiln train` starts it, and the write end
    of its pipe."""
    read, write = os.pipe()
    agent = subprocess.Popen(
        [sys.executable, "-m", "pretrain.torchrun", "--args-fd", str(read)], pass_fds=(read,),
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    os.close(read)
    return agent, write


def test_the_warm_torchrun_agent_runs_what_it_is_sent_and_ends_when_sent_nothing(
    tmp_path: Path,
) -> None:
    """`kiln train` starts torchrun's agent before composing its config and then sends it
    torchrun's arguments, the environment and the directory (pretrain/torchrun.py)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    (tmp_path / "elsewhere").mkdir()
    agent, write = start_warm_agent()
    argv = ["--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", "--master_port=0"]
    request = {
        "argv": [*argv, str(script)],
        "env": os.environ | {"KILN_AGENT_PROBE": "sent"},
        "cwd": str(tmp_path / "elsewhere"),
    }
    with os.fdopen(write, "w") as pipe:
        json.dump(request, pipe)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode == 0, output
    lines = sorted(line for line in output.splitlines() if line.startswith("rank "))
    assert lines == [f"rank {r} sent {tmp_path / 'elsewhere'}" for r in (0, 1)], output

    # sent nothing (the run needed no torchrun, or its config was wrong): it ends, quietly,
    # and a Ctrl-C while `kiln train` composes is left to `kiln train`
    agent, write = start_warm_agent()
    time.sleep(0.5)
    agent.send_signal(signal.SIGINT)
    os.close(write)
    output, _ = agent.communicate(timeout=120)
    assert (agent.returncode, output) == (0, "")


FORK_SCRIPT = """
import atexit, json, os, signal, sys
import torch
from pretrain.train import as_new_process

marker = sys.argv[1]
atexit.register(lambda: open(marker, "a").write("agent's hook\\n"))
signal.signal(signal.SIGTERM, lambda *_: None)  # as torchrun's agent has, and a rank must not
signal.signal(signal.SIGINT, signal.SIG_IGN)
torch.set_num_threads(2)
os.environ["OMP_NUM_THREADS"] = "1"  # the ranks' environment, set after the agent started
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    as_new_process()
    state = {"session": os.getsid(0) == os.getpid(),
             "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
             "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
             "threads": torch.get_num_threads()}
    sys.stdout.write(json.dumps(state) + "\\n")  # not flushed: a rank's output is unbuffered
    atexit._run_exitfuncs()  # a rank's own hooks: none of the agent's
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_rank_forked_from_the_agent_starts_as_a_new_process_would(tmp_path: Path) -> None:
    """CPU ranks are forked from the warm agent (`pretrain.train.forked_rank`): they get a
    session of their own, Python's signal handlers, the environment's thread count, unbuffered
    output and none of the agent's exit hooks, as `python -u -m pretrain.train` started by
    torchrun would have."""
    marker = tmp_path / "hooks"
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(marker)], cwd=Path(__file__).resolve().parents[2],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"session": True, "sigterm": True, "sigint": True,
                                         "threads": 1}  # fmt: skip
    assert marker.read_text() == "agent's hook\n"  # the agent's exit alone ran it


def test_a_train_that_needs_no_torchrun_leaves_no_agent_behind(tmp_path: Path) -> None:
    """A config error (or one rank) discards the warm agent: when `kiln train` has exited,
    nothing it started is left in its session."""
    train = subprocess.Popen(
        [KILN, "train", "model=tiny_decoder", "cluster=local_cpu", "cluster.gpus_per_node=2",
         "data.path=missing", "logger=none", f"trainer.run_dir={tmp_path}/run"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _, stderr = train.communicate(timeout=120)
    assert train.returncode == 1 and "no manifest" in stderr, stderr
    session = subprocess.run(["ps", "-e", "-o", "sid=,args="], capture_output=True, text=True)
    left = [line for line in session.stdout.splitlines() if line.split()[0] == str(train.pid)]
    assert left == []
