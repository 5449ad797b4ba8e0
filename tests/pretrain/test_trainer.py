"""`kiln train` end to end on 2 CPU ranks (torchrun, gloo): the loss falls, a SIGKILLed run
resumes bitwise, injected NaNs are skipped and counted, SIGTERM saves and asks for a requeue."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loader import write_corpus

from pretrain.config import OptimConfig
from pretrain.optim import lr_lambda
from pretrain.preflight import no_gpu

KILN = Path(sys.executable).parent / "kiln"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [200, 150, 180]}, {"web": 1.0})
    return out


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_decoder", "objective=clm", "engine=ddp", "cluster=local_cpu", "data=small",
        f"data.path={corpus}", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
        "trainer.max_steps=12", "trainer.checkpoint_every=4", "trainer.eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none", "logger.log_every=1", *extra,
    ]  # fmt: skip


def kiln_train(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KILN), "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def test_loss_falls_and_checkpoints_rotate(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = kiln_train(train_args(corpus, run_dir, "trainer.max_steps=24"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    per_step = losses(run_dir)
    assert sorted(per_step) == list(range(1, 25))
    assert sum(list(per_step.values())[-4:]) / 4 < per_step[1] - 0.5  # it learns
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000016", "step_00000020", "step_00000024"]  # keep_checkpoints=3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000024"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no Hydra runs/train/DATE/ in cwd
    from pretrain.checkpoint_io import load_consolidated  # the export's input, at the end

    model_cfg, model = load_consolidated(run_dir / "final")
    assert model_cfg.name == "tiny_decoder" and sum(p.numel() for p in model.parameters()) > 0


def test_a_sweep_trains_each_point_in_its_own_run_directory(corpus: Path, tmp_path: Path) -> None:
    """`kiln train -m`: point N trains in RUN_DIR/sweep-N (in one directory the second point
    resumed the first's last checkpoint and trained nothing); the last step's loss is logged
    whatever logger.log_every, and the first; resuming a finished run says there is nothing to
    train."""
    run_dir = tmp_path / "run"
    args = [a for a in train_args(corpus, run_dir, "trainer.max_steps=5", "logger.log_every=3")
            if a != "optim.lr=3e-3"]  # fmt: skip
    result = kiln_train(["-m", *args, "optim.lr=1e-3,3e-3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["sweep-0", "sweep-1"]
    points = [losses(run_dir / f"sweep-{n}") for n in (0, 1)]
    assert [sorted(p) for p in points] == [[1, 3, 5], [1, 3, 5]]
    assert points[0][5] != points[1][5]
    configs = [(run_dir / f"sweep-{n}" / "config.yaml").read_text() for n in (0, 1)]
    assert "lr: 0.001\n" in configs[0] and "lr: 0.003\n" in configs[1]
    header = configs[0].splitlines()[:4]  # what the YAML leaves implicit (which objective)
    assert header[1].startswith("# groups: cluster=local_cpu ") and " engine=ddp " in header[1]
    assert " model=tiny_decoder objective=clm " in header[1]
    typed = [line.split(": ", 1)[1].split() for c in configs for line in c.splitlines()[2:3]]
    assert [t[-1] for t in typed] == ["optim.lr=0.001", "optim.lr=0.003"]  # each point's
    assert typed[0][:-1] == typed[1][:-1] and {"trainer.max_steps=5", "logger.log_every=3"} < set(
        typed[0]
    )
    assert header[3] == (
        "# schemas: model=DecoderConfig objective=CausalLMConfig engine=DDPEngineConfig "
        "optim=OptimConfig cluster=LocalClusterConfig logger=LoggerConfig"
    )

    # a rerun (here with another optim.lr) starts nothing and rewrites nothing
    again = kiln_train(train_args(corpus, run_dir / "sweep-0", "trainer.max_steps=5"), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.strip() == (
        f"kiln train: {run_dir / 'sweep-0' / 'checkpoints' / 'step_00000005'} is at step 5, "
        f"trainer.max_steps=5: nothing to train ({run_dir / 'sweep-0' / 'final'} holds that "
        "step; a larger trainer.max_steps trains on)"
    )
    assert (run_dir / "sweep-0" / "config.yaml").read_text() == configs[0]
    assert sorted(losses(run_dir / "sweep-0")) == [1, 3, 5]

    # extended: the cosine schedule is drawn for the new length (said), final/ moves on, and
    # kiln report tells where the run stands
    longer = kiln_train(train_args(corpus, run_dir / "sweep-0", "trainer.max_steps=8"), tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    said = longer.stdout.splitlines()  # where the run goes and what it trains; what next
    assert said[0].startswith(f"kiln train: {run_dir / 'sweep-0'}: model=tiny_decoder (")
    assert (
        "objective=clm, ddp on 2 ranks; steps 5 -> 8 of 8 x 32 tokens (768 tokens to go)" in said[0]
    )
    assert said[-1] == (
        f"kiln train: done at step 8; next: kiln report report.run_dir={run_dir / 'sweep-0'}, "
        f"kiln export export.checkpoint={run_dir / 'sweep-0'} export.output_dir=DIR"
    )
    assert (
        "kiln train: resuming step_00000005 with settings changed since it was saved: "
        "logger.log_every=3 (now 1), optim.lr=0.001 (now 0.003), run_name=default-0 (now "
        "default), trainer.max_steps=5 (now 8); this run's apply from here\n"
        "kiln train: the learning rate at step 5 goes from 0.0001 to 0.00165 (cosine schedule "
        "of optim.lr=0.003 over trainer.max_steps=8) (optim.schedule=wsd holds"
    ) in longer.stderr
    records = (run_dir / "sweep-0" / "metrics.jsonl").read_text().splitlines()
    rates = {r["step"]: r["lr"] for r in map(json.loads, records) if r.get("kind") == "train"}
    # the rate each step trained at (the schedule's value at its 0-based index)
    cosine = OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert rates[1] == pytest.approx(1e-3 / 2)  # warmup: lr / warmup_steps, not 0
    assert rates[5] == pytest.approx(1e-3 * lr_lambda(cosine, 5)(4))
    assert rates[6] == pytest.approx(3e-3 * lr_lambda(cosine, 8)(5))  # first after the resume
    assert rates[8] == pytest.approx(3e-3 * lr_lambda(cosine, 8)(7))
    assert rates[8] > 3e-4  # the last step trains above the floor (0.1 x optim.lr)
    report = subprocess.run([str(KILN), "report", f"report.run_dir={run_dir / 'sweep-0'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    rows = dict(line.strip().split("  ", 1) for line in report.stdout.splitlines()
                if line.startswith("  "))  # fmt: skip
    assert rows["status"].strip() == "finished at step 8"
    # the data ledger, logged at each checkpoint: the epochs of each source read
    data = [r for r in map(json.loads, records) if r.get("event") == "data"]
    assert data and data[-1]["step"] == 8 and all(v > 0 for k, v in data[-1].items()
                                                  if k.startswith("epochs/"))  # fmt: skip
    assert rows["epochs read"].strip().endswith("(at step 8)")
    assert rows["final"].strip() == f"{run_dir / 'sweep-0' / 'final'} (step 8)"


def running(pid: str) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waits for its parent's wait)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_sigkill_and_resume_gives_bitwise_identical_losses(corpus: Path, tmp_path: Path) -> None:
    """Killed and resumed, the run's losses are the uninterrupted run's, bit for bit; the
    uninterrupted run's ranks start as new processes (`KILN_FORK_RANKS=0`, as CUDA ranks do),
    the killed run's are forked from torchrun's agent: both start alike."""
    reference = tmp_path / "reference"
    env = dict(os.environ, KILN_FORK_RANKS="0")
    assert kiln_train(train_args(corpus, reference), tmp_path, env).returncode == 0
    run_dir = tmp_path / "killed"
    process = subprocess.Popen([str(KILN), "train", *train_args(corpus, run_dir)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    ps = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,sid=,args="], capture_output=True,
                        text=True).stdout  # fmt: skip
    rows = [line.split(None, 3) for line in ps.splitlines()]
    (agent,) = [pid for pid, _, sid, args in rows
                if sid == str(process.pid) and "pretrain.torchrun" in args]  # fmt: skip
    ranks = {pid: args for pid, ppid, _, args in rows if ppid == agent}
    os.killpg(process.pid, signal.SIGKILL)  # `kiln train` and torchrun's agent
    process.wait()
    # the 2 ranks are forks of the agent (not `python -m pretrain.train`), each in a session of
    # its own as torchrun starts them, and they end with the agent: the kernel sends them
    # SIGTERM as it dies, and they save the step they are at first
    assert len(ranks) == 2 and all("pretrain.torchrun" in args for args in ranks.values()), ranks
    while any(map(running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, ranks)), "a rank outlived torchrun's agent"
    saved = json.loads((latest.parent / latest.read_text() / "trainer.json").read_text())["step"]
    assert 4 <= saved < 12 and latest.read_text() == f"step_{saved:08d}"
    result = kiln_train(train_args(corpus, run_dir), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = losses(run_dir), losses(reference)
    assert ours.keys() == theirs.keys()
    assert ours == theirs  # bitwise: the same floats, step by step


def test_injected_nan_is_skipped_and_counted(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    env = dict(os.environ, KILN_FAULT_NAN_STEPS="3,4")
    result = kiln_train(train_args(corpus, run_dir, "trainer.max_steps=8"), tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    assert train[3]["skipped"] and train[4]["skipped"] and not train[5]["skipped"]
    assert train[8]["nonfinite_steps"] == 2
    assert all(v == v for v in (train[s]["loss"] for s in (5, 6, 7, 8)))  # finite again


@pytest.mark.parametrize(("ranks", "to"), [(2, "group"), (2, "group-started-workers"),
                                           (2, "kiln"), (2, "kiln-started"), (1, "kiln")])  # fmt: skip
def test_sigterm_saves_and_exits_with_the_requeue_status(
    corpus: Path, tmp_path: Path, ranks: int, to: str
) -> None:
    """SIGTERM (Slurm's warning) to every process of the run's process group, or to the
    `kiln train` process alone, which passes it on to the ranks (at 2 ranks to torchrun's
    ranks themselves, forked from its agent or started as new processes as CUDA ranks are,
    not to torchrun, which would kill them 30 s later and print its stack; at 1 rank to the
    warm agent that trains it). With DataLoader workers, which get the signal too, as in
    Slurm's step (group-started-workers)."""
    from pretrain.trainer import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "term"
    args = train_args(corpus, run_dir, "trainer.max_steps=100000",
                      "trainer.checkpoint_every=100000", f"cluster.gpus_per_node={ranks}",
                      f"data.num_workers={int(to.endswith('workers'))}")  # fmt: skip
    env = dict(os.environ, KILN_FORK_RANKS="0" if "started" in to else "1")
    process = subprocess.Popen([str(KILN), "train", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    wait_for_steps(run_dir, 3)
    if to.startswith("kiln"):
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGTERM)  # what Slurm sends at the time limit
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    step = json.loads((run_dir / "checkpoints" / latest / "trainer.json").read_text())["step"]
    assert step >= 3 and latest == f"step_{step:08d}"
    said = f"kiln train: stopped by a signal at step {step}, saved {run_dir}/checkpoints/{latest}"
    assert said in stderr, stderr[-3000:]
    if to.startswith("kiln"):  # the ranks' own lines alone: no torchrun stack, no failure table
        assert "Traceback" not in stderr and "death signal" not in stderr, stderr[-3000:]
        assert "exitcode" not in stderr, stderr[-3000:]


def wait_for_steps(run_dir: Path, steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while (
        not metrics.is_file() or len(metrics.read_text().splitlines()) < steps + 1
    ) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_killed_kiln_train_stops_its_ranks(corpus: Path, tmp_path: Path) -> None:
    """SIGKILL to `kiln train` (no handler runs) stops its torchrun agent and ranks too: the
    kernel sends the agent SIGTERM when its parent dies, and the ranks get it from torchrun,
    save and exit. Before, they trained on, and a rerun trained beside them in the same run
    directory."""
    import psutil

    run_dir = tmp_path / "killed"
    args = train_args(corpus, run_dir, "trainer.max_steps=100000",
                      "trainer.checkpoint_every=100000", "cluster.gpus_per_node=2")  # fmt: skip
    process = subprocess.Popen([str(KILN), "train", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    wait_for_steps(run_dir, 3)
    tree = psutil.Process(process.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in tree]
    assert sum("pretrain.torchrun" in c for c in commands) >= 3, commands  # agent, 2 ranks
    process.kill()
    process.wait()
    deadline = time.monotonic() + 120

    def running(p: psutil.Process) -> bool:
        try:  # an orphan's zombie waits for whoever reaps it: it has stopped
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while any(running(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p.pid for p in tree if running(p)], "processes of the run outlived kiln train"
    latest = (run_dir / "checkpoints" / "latest").read_text()
    step = json.loads((run_dir / "checkpoints" / latest / "trainer.json").read_text())["step"]
    assert step >= 3  # the ranks saved as they stopped
    assert json.loads((run_dir / "exit.json").read_text())["exit_code"] == 42


def test_ctrl_c_stops_at_once_and_says_where_the_run_stands(corpus: Path, tmp_path: Path) -> None:
    """Ctrl-C in the terminal (SIGINT to the foreground process group: `kiln train` and its
    torchrun agent; the ranks have sessions of their own and get it from torchrun): exit 130,
    one line naming the checkpoint to continue from, no traceback per rank."""
    run_dir = tmp_path / "interrupted"
    args = train_args(corpus, run_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=2",
                      "cluster.gpus_per_node=2")  # fmt: skip
    process = subprocess.Popen([str(KILN), "train", *args], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    wait_for_steps(run_dir, 3)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    said = (f"kiln train: interrupted; the latest checkpoint is {latest} (trainer.resume=auto "
            "continues from it)")  # fmt: skip
    assert stderr.strip() == said  # no torchrun lines ("death signal", "Closing process")
    ended = json.loads((run_dir / "exit.json").read_text())
    saved = json.loads((latest / "trainer.json").read_text())["step"]
    assert ended["exit_code"] == 130 and ended["step"] >= saved
    report = subprocess.run([str(KILN), "report", f"report.run_dir={run_dir}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"interrupted (Ctrl-C) after step {ended['step']}" in report.stdout, report.stdout


def test_a_run_directory_in_use_is_refused_before_any_rank_starts(
    corpus: Path, tmp_path: Path
) -> None:
    from pretrain.run_lock import hold

    run_dir = tmp_path / "busy"
    with hold(run_dir):  # what rank 0 of a run training there holds
        result = kiln_train(train_args(corpus, run_dir, "cluster.gpus_per_node=2"), tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"kiln train: trainer.run_dir={run_dir} is in use by another training run (pid "
        f"{os.getpid()} on "
    ), result.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written there
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = kiln_train(train_args(corpus, a_file), tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"kiln train: trainer.run_dir={a_file} is a file, not a directory\n"


def test_ranks_a_launcher_starts_wait_for_rank_0s_lock(corpus: Path, tmp_path: Path) -> None:
    """Ranks a launcher starts itself (a Slurm job step, Ray Train's workers) skip `kiln
    train`'s preflight: rank 0 waits for the run directory's lock, and the other ranks wait
    for rank 0 (one that went ahead resumed from another step than rank 0 did, and their
    collectives never matched); a lock still held after $KILN_RUN_LOCK_WAIT reaches every
    rank, each of which says it in one line, and nothing is written."""
    from hydra import compose, initialize_config_module

    from pretrain.config import build_config, register_configs
    from pretrain.run_lock import hold
    from pretrain.train import write_run_config

    register_configs()
    run_dir = tmp_path / "run"
    with initialize_config_module("hydra_conf", version_base="1.3"):
        cfg = build_config(compose("train", train_args(corpus, run_dir, "cluster.gpus_per_node=2")))
    config = write_run_config(cfg, tmp_path / "launch")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "pretrain.train", str(config)]  # fmt: skip
    with hold(run_dir):  # another job training there
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env=os.environ | {"KILN_RUN_LOCK_WAIT": "2"})  # fmt: skip
    assert result.returncode != 0
    for rank in (0, 1):
        said = f"kiln train: rank {rank}: trainer.run_dir={run_dir} is in use by another training"
        assert said in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.skipif(not no_gpu(), reason="this machine has a GPU")
def test_a_cuda_run_on_a_machine_without_a_gpu_is_refused(corpus: Path, tmp_path: Path) -> None:
    """cluster=local (8 x H100) on a CPU machine trained its 8 ranks on the CPU instead, at a
    batch sized for GPUs: a step took minutes."""
    run_dir = tmp_path / "run"
    args = [a for a in train_args(corpus, run_dir) if a != "cluster=local_cpu"]
    result = kiln_train(["cluster=local", "cluster.gpus_per_node=2", *args], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "kiln train: cluster.accelerator=cuda (1 x 2 H100-SXM), but torch sees no CUDA device "
        "on this machine; on the CPU use cluster=local_cpu, or experiment=demo for a run sized "
        "for it"
    )
    assert not run_dir.exists()


def test_timed_checkpoints(corpus: Path, tmp_path: Path) -> None:
    """trainer.checkpoint_minutes: a checkpoint once that much time passed since the last one
    (decided on rank 0, agreed by all ranks), whatever checkpoint_every says."""
    run_dir = tmp_path / "run"
    args = train_args(corpus, run_dir, "trainer.checkpoint_every=1000",
                      "trainer.checkpoint_minutes=0.0001")  # 6 ms: every step  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = [r["step"] for r in records if r.get("event") == "checkpoint"]
    assert saved == list(range(1, 13))


def test_watchdog_dumps_the_stacks_of_a_stalled_step(corpus: Path, tmp_path: Path) -> None:
    """A step that stalls longer than trainer.watchdog_seconds gets every thread's stack
    dumped to stderr (faulthandler), and the run carries on."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, KILN_FAULT_HANG_STEPS="5", KILN_FAULT_HANG_SECONDS="4")
    args = train_args(corpus, run_dir, "trainer.max_steps=6", "trainer.watchdog_seconds=2")
    result = kiln_train(args, tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Timeout (0:00:02)!" in result.stderr
    assert "in train" in result.stderr and "pretrain/trainer.py" in result.stderr
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_profiler_writes_a_trace_and_a_summary_per_rank(corpus: Path, tmp_path: Path) -> None:
    """trainer.profile: steps 4-5 recorded on both ranks (step 3 warms the profiler up); each
    rank writes a Chrome trace and a summary, rank 0 logs where the step time went, and only
    the steps run under the profiler are flagged."""
    run_dir = tmp_path / "run"
    args = train_args(corpus, run_dir, "trainer.max_steps=6", "trainer.profile.start_step=4",
                      "trainer.profile.steps=2", "trainer.profile.ranks=[]")  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    window = run_dir / "profile" / "step4-5"
    assert sorted(p.name for p in window.iterdir()) == [
        "rank0.summary.txt", "rank0.trace.json.gz", "rank1.summary.txt", "rank1.trace.json.gz"
    ]  # fmt: skip
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((window / f"rank{rank}.trace.json.gz").read_bytes()))
        names = {event.get("name") for event in trace["traceEvents"]}
        assert {"data", "forward_backward", "optimizer_step"} <= names
        steps = sorted(n for n in names if str(n).startswith("ProfilerStep#"))
        assert len(steps) == 2  # the two recorded steps, not the warm-up one
        assert "aten::mm" in names or "aten::addmm" in names
        summary = (window / f"rank{rank}.summary.txt").read_text()
        assert summary.startswith(f"kiln trainer.profile: rank {rank}, steps 4-5 (2 recorded)")
        assert "Self CPU" in summary and "forward_backward" in summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flagged = [r["step"] for r in records if r.get("kind") == "train" and r.get("profiled")]
    assert flagged == [3, 4, 5]  # the warm-up step runs under the profiler too
    (event,) = [r for r in records if r.get("event") == "profile"]
    assert event["step"] == 5 and event["first_step"] == 4
    assert event["trace"] == str(window / "rank0.trace.json.gz")
    regions = event["profile/regions_ms"]
    assert set(regions) == {"data", "forward_backward", "optimizer_step"}
    assert regions["forward_backward"] > 0 and regions["optimizer_step"] > 0
    # the loop's parts take most, not more, of the mean step the trainer measured (the two are
    # timed by different clocks: the profiler's region bounds add a little, 0.2% once)
    assert sum(regions.values()) < 1.05 * event["step_ms"]
    top = event["profile/top"]
    assert 1 <= len(top) <= 10 and all(t["ms_per_step"] > 0 for t in top)
    assert [t["ms_per_step"] for t in top] == sorted((t["ms_per_step"] for t in top), reverse=True)
    assert 0 < sum(t["share"] for t in top) <= 1.0 + 1e-9
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_attention_backends_pick_the_kernel(corpus: Path, tmp_path: Path) -> None:
    """engine.attention_backends: a profiled step shows the attention kernel asked for (on the
    CPU: SDPA's math path, or its flash kernel), and both train the same."""
    kernels = {"[math]": "aten::_scaled_dot_product_attention_math",
               "[flash,math]": "aten::_scaled_dot_product_flash_attention_for_cpu"}  # fmt: skip
    first = {}
    for backends, kernel in kernels.items():
        run_dir = tmp_path / backends.strip("[]").replace(",", "-")
        args = train_args(corpus, run_dir, "cluster.gpus_per_node=1", "trainer.max_steps=3",
                          f"engine.attention_backends={backends}", "trainer.checkpoint_every=0",
                          "trainer.profile.start_step=3", "trainer.profile.steps=1")  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        trace = run_dir / "profile" / "step3-3" / "rank0.trace.json.gz"
        names = {
            e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        }
        (other,) = set(kernels.values()) - {kernel}
        assert kernel in names and other not in names
        first[backends] = losses(run_dir)
    assert first["[math]"][1] == pytest.approx(first["[flash,math]"][1], rel=1e-5)
    assert first["[math]"][3] == pytest.approx(first["[flash,math]"][3], rel=1e-4)


def _step_all_reduce_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pretrain.trainer import step_all_reduce

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # a stop signal and a timed checkpoint seen by one rank each; the losses of both ranks
    means, flags = step_all_reduce([1.0 + rank, 10.0 * rank], [rank == 1, rank == 0, False])
    nan_means, _ = step_all_reduce([float("nan") if rank else 1.0], [])
    Path(f"{out}.{rank}").write_text(json.dumps({"means": means, "flags": flags,
                                                 "nan": str(nan_means[0])}))  # fmt: skip
    dist.destroy_process_group()


def test_one_all_reduce_gives_every_rank_the_mean_loss_and_any_ranks_flags(tmp_path: Path) -> None:
    """The loop's per-step collective: every rank gets the mean of the ranks' losses and stops or
    checkpoints when any rank says so (a SIGTERM delivered to one rank only stops them all)."""
    import socket

    import torch.multiprocessing as mp

    from pretrain.trainer import step_all_reduce

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "reduced")
    mp.spawn(_step_all_reduce_rank, args=(port, out), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads(Path(f"{out}.{rank}").read_text())
        assert got == {"means": [1.5, 5.0], "flags": [True, True, False], "nan": "nan"}, rank
    # one process, no process group: the values as they are
    assert step_all_reduce([2.5], [True, False]) == ([2.5], [True, False])
