"""`kiln launch cluster=slurm` against the real single-node test cluster: a 2-task job trains
to completion, a job warned mid-run requeues itself and ends with the uninterrupted run's
losses, a 2-node script passes `sbatch --test-only`, hostile config strings stay literal,
multirun submits one job per sweep point; plus host-list expansion and rank mapping."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm import expand_nodelist, rank_layout, time_limit_minutes, torch_env_from_slurm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pretrain"))
from test_loader import write_corpus  # noqa: E402 (a corpus writer shared with tests/pretrain)

KILN = Path(sys.executable).parent / "kiln"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [200, 150, 180]}, {"web": 1.0})
    return out


def launch_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "cluster=slurm", "cluster.accelerator=cpu", "cluster.gpus_per_node=2",
        "cluster.cpus_per_task=1", "cluster.time_limit=00:10:00", "model=tiny_decoder",
        "objective=clm", "engine=ddp", "data=small", f"data.path={corpus}", "data.seq_len=32",
        "data.global_batch_size=8", "data.micro_batch_size=2", "data.shuffle_buffer=64",
        f"trainer.run_dir={quoted(str(run_dir))}", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4",
        "trainer.eval_every=0", "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none",
        "logger.log_every=1", *extra,
    ]  # fmt: skip


def kiln_launch(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), "launch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"}


def submitted_job(run_dir: Path) -> int:
    return int((run_dir / "slurm" / "job_id").read_text())


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in (run_dir / "slurm").glob("*.out"))


# --------------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize(
    "nodelist",
    ["vm", "gpu[01-03,07],login1", "r[1-2]-n[08-10]", "a,b[9-11],c[001-002]", "node[7]"],
)
def test_nodelist_expands_as_scontrol_does(nodelist: str, slurm_cluster) -> None:
    result = slurm_cluster.run("scontrol", "show", "hostnames", nodelist)
    assert expand_nodelist(nodelist) == result.stdout.split()


@pytest.mark.parametrize(("nodes", "per_node"), [(1, 1), (1, 2), (2, 4), (3, 8)])
def test_ranks_of_n_nodes_by_g_gpus(nodes: int, per_node: int) -> None:
    """One task per rank: Slurm's block distribution numbers tasks node by node; the mapping
    gives torch's variables, and they agree with torchrun's numbering (rank_layout)."""
    hosts = [f"gpu{n:02d}" for n in range(1, nodes + 1)]
    nodelist = f"gpu[01-{nodes:02d}]" if nodes > 1 else "gpu01"
    layout = rank_layout(nodes, per_node)
    assert [r["rank"] for r in layout] == list(range(nodes * per_node))
    for entry in layout:
        env = {
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": str(nodes * per_node),
            "SLURM_NTASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_NODEID": str(entry["node_rank"]),
            "SLURM_PROCID": str(entry["rank"]), "SLURM_LOCALID": str(entry["local_rank"]),
        }  # fmt: skip
        mapped = torch_env_from_slurm(env)
        assert mapped == {
            "RANK": str(entry["rank"]), "WORLD_SIZE": str(nodes * per_node),
            "LOCAL_RANK": str(entry["local_rank"]), "LOCAL_WORLD_SIZE": str(per_node),
            "NODE_RANK": str(entry["node_rank"]), "MASTER_ADDR": hosts[0], "MASTER_PORT": "29500",
        }  # fmt: skip


def test_time_limits_parse_like_slurm() -> None:
    cases = {
        "30": 30,
        "1:30": 1.5,
        "01:00:00": 60,
        "1-00": 1440,
        "1-2:30": 1590,
        "2-0:0:30": 2880.5,
    }
    assert {k: time_limit_minutes(k) for k in cases} == cases


# --------------------------------------------------------------------------------------------
# scripts


def test_multi_node_script_passes_sbatch_test_only(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = kiln_launch(launch_args(corpus, run_dir, "cluster.nodes=2", "cluster.partition=multi",
                                     "cluster.dry_run=true"), tmp_path, slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "#SBATCH --signal=B:USR1@120\n" in script and "#SBATCH --requeue\n" in script
    assert '--nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node=2 --rdzv_backend=c10d' in script
    # the rendezvous port comes from the job id: jobs sharing a node do not share it
    assert 'export KILN_RDZV_PORT="$((20000 + SLURM_JOB_ID % 10000))"\n' in script
    assert not (run_dir / "slurm" / "job_id").exists()  # a dry run submits nothing
    check = slurm_cluster.run("sbatch", "--test-only", str(run_dir / "slurm" / "job.sbatch"),
                              check=False)  # fmt: skip
    assert check.returncode == 0, check.stderr
    node = slurm_cluster.node_name
    assert f"on nodes {node},{node}-cloud in partition multi" in check.stderr
    assert "  checkpoint_minutes: 2.5\n" in (run_dir / "config.yaml").read_text()  # 10 min / 4
    command = (run_dir / "command.txt").read_text().splitlines()
    assert command[1].startswith("kiln launch cluster=slurm") and command[3].startswith("sbatch")
    fixed = kiln_launch(launch_args(corpus, tmp_path / "fixed", "launch.rdzv_port=29400",
                                    "cluster.dry_run=true"), tmp_path, slurm_cluster.env())  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    script = (tmp_path / "fixed" / "slurm" / "job.sbatch").read_text()
    assert "export KILN_RDZV_PORT=29400\n" in script


HOSTILE = "evil\"' $(touch PWNED1) `touch PWNED2`; touch PWNED3\nrm -rf x #"


def quoted(value: str) -> str:
    """A Hydra override value that keeps `value` as it is (quotes, $, newlines)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_hostile_config_strings_stay_literal(slurm_cluster, corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / f"runs {HOSTILE}"
    result = kiln_launch(launch_args(corpus, run_dir, f"run_name={quoted(HOSTILE)}",
                                     "cluster.constraint='$(touch PWNED4)'", "cluster.dry_run=true"),
                         tmp_path, slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert f"KILN_RUN_DIR={shlex.quote(str(run_dir))}\n" in script  # quoted, newline included
    assert '#SBATCH --constraint="$(touch PWNED4)"' in script  # sbatch runs no shell on it
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"kiln-train-{HOSTILE}")  # only safe characters
    assert f"#SBATCH --job-name={name}\n" in script
    assert subprocess.run(["bash", "-n", str(run_dir / "slurm" / "job.sbatch")]).returncode == 0
    bad = kiln_launch(launch_args(corpus, tmp_path / "bad", "cluster.partition='debug\n#SBATCH --x'",
                                  "cluster.dry_run=true"), tmp_path, slurm_cluster.env())  # fmt: skip
    assert bad.returncode == 1 and "cluster.partition=" in bad.stderr and "newline" in bad.stderr
    assert not list(tmp_path.rglob("PWNED*"))


# --------------------------------------------------------------------------------------------
# jobs


@pytest.fixture(scope="module")
def two_task_run(slurm_cluster, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of 2 tasks (one per rank, launch_mode=srun) training to the end; its run name
    and directory are hostile strings, which must reach the job literally."""
    cwd = tmp_path_factory.mktemp("two_tasks")
    run_dir = cwd / f"runs {HOSTILE}"
    result = kiln_launch(launch_args(corpus, run_dir, f"run_name={quoted(HOSTILE)}",
                                     "cluster.launch_mode=srun", "launch.wait=true"),
                         cwd, slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ended: COMPLETED" in result.stdout
    assert not list(cwd.rglob("PWNED*"))
    return run_dir


def test_two_task_job_trains_to_completion(two_task_run: Path, slurm_cluster) -> None:
    per_step = losses(two_task_run)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    assert sum(list(per_step.values())[-4:]) / 4 < per_step[1] - 0.5
    assert (two_task_run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert json.loads((two_task_run / "exit.json").read_text())["exit_code"] == 0
    script = (two_task_run / "slurm" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "launch.slurm_task train" in script
    log = log_text(two_task_run)
    assert "exit status 0" in log
    start = [json.loads(line) for line in (two_task_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in start if r.get("event") == "start"] == [2]


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_warned_job_checkpoints_requeues_and_matches_the_uninterrupted_run(
    two_task_run: Path, slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    """torchrun mode (one task per node): Slurm's warning to the batch shell (what
    --signal=B:USR1 sends before the time limit) makes the ranks checkpoint and exit 42; the
    script requeues the job, which resumes in the same run directory and ends with the same
    per-step losses as the uninterrupted 2-rank run."""
    run_dir = tmp_path / "run"
    result = kiln_launch(launch_args(corpus, run_dir), tmp_path, slurm_cluster.env())
    assert result.returncode == 0, result.stderr[-3000:]
    job = submitted_job(run_dir)
    assert f"submitted Slurm job {job}" in result.stdout
    latest = run_dir / "checkpoints" / "latest"
    wait_for(latest.is_file, 120, "the first checkpoint")
    assert slurm_cluster.job_state(job) == "RUNNING"
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    # requeued: held until its old credential expires (cred_expire=10 on the test cluster)
    wait_for(lambda: "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", str(job)).stdout,
             120, "the requeue")  # fmt: skip
    assert slurm_cluster.wait(job, timeout=240) == "COMPLETED", log_text(run_dir)
    log = log_text(run_dir)
    assert "got SIGUSR1" in log and "exit status 42" in log and "requeueing job" in log
    assert "slice 1," in log and "exit status 0" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"].endswith(starts[1]["resumed_from"][-13:])
    assert 0 < starts[1]["step"] < STEPS
    assert losses(run_dir) == losses(two_task_run)  # bitwise, every step


def test_scancel_ends_the_job_after_it_saves_without_requeueing(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    """`scancel JOB` (SIGTERM to the batch shell and the tasks): the ranks finish their step
    and save, and the job stays cancelled; only Slurm's warning before the time limit (USR1)
    requeues (the script requeued on any signal, so a scancel'd job came back, every time).
    The log holds kiln's lines, not torchrun's traceback of its own stack."""
    run_dir = tmp_path / "run"
    result = kiln_launch(launch_args(corpus, run_dir, "trainer.max_steps=4000"), tmp_path,
                         slurm_cluster.env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    job = submitted_job(run_dir)
    wait_for((run_dir / "checkpoints" / "latest").is_file, 120, "the first checkpoint")
    slurm_cluster.run("scancel", str(job))
    wait_for(lambda: "not requeueing" in log_text(run_dir), 60, "the script's last line")
    time.sleep(2)  # what a requeue would have done by now
    show = slurm_cluster.run("scontrol", "show", "job", str(job)).stdout
    assert "JobState=CANCELLED" in show and "Restarts=0" in show, show
    log = log_text(run_dir)
    assert "got SIGTERM (scancel, or a preemption)" in log and "exit status 42" in log
    assert "requeueing job" not in log and "Traceback" not in log, log[-3000:]
    saved = (run_dir / "checkpoints" / "latest").read_text()
    assert json.loads((run_dir / "exit.json").read_text())["step"] == int(saved[5:])


def test_launches_that_cannot_run_are_refused_before_anything_is_written(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    """Found before submitting: a time-limit warning that leaves no time to train, shards that
    are not there (kiln train's preflight), and a job of the same run directory still queued
    (it would start with the new launch's config.pkl); a request the partition can never
    satisfy is said, not waited for forever."""
    env = slurm_cluster.env()
    short = kiln_launch(launch_args(corpus, tmp_path / "short", "cluster.time_limit=00:01:00"),
                        tmp_path, env)  # fmt: skip
    assert short.returncode == 1
    assert ("kiln launch: cluster.signal_seconds=120 is more than half of "
            "cluster.time_limit=00:01:00 (60 s)") in short.stderr  # fmt: skip
    missing = kiln_launch(launch_args(tmp_path / "nowhere", tmp_path / "nodata"), tmp_path, env)
    assert missing.returncode == 1 and f"{tmp_path / 'nowhere'}" in missing.stderr
    assert not (tmp_path / "short").exists() and not (tmp_path / "nodata").exists()

    run_dir = tmp_path / "queued"
    later = "cluster.extra_sbatch=['--begin=now+600']"
    first = kiln_launch(launch_args(corpus, run_dir, later), tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    job = submitted_job(run_dir)
    config = (run_dir / "config.pkl").read_bytes()
    again = kiln_launch(launch_args(corpus, run_dir, "optim.lr=5e-2"), tmp_path, env)
    assert again.returncode == 1
    assert f"kiln launch: Slurm job {job} of {run_dir} is still PENDING" in again.stderr
    assert (run_dir / "config.pkl").read_bytes() == config and submitted_job(run_dir) == job
    slurm_cluster.run("scancel", str(job))

    big = kiln_launch(launch_args(corpus, tmp_path / "big", "cluster.nodes=4", "launch.wait=true",
                                  "data.global_batch_size=16"),
                      tmp_path, env)  # fmt: skip
    job = submitted_job(tmp_path / "big")
    slurm_cluster.run("scancel", str(job))
    assert big.returncode == 1, big.stdout[-2000:] + big.stderr[-2000:]
    assert f"kiln launch: job {job} will not start: it asks for more" in big.stderr


def test_guard_stops_requeueing_a_slice_without_progress(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    """The script's forward-progress guard, with a stand-in for the trainer (cluster.python):
    warned before the time limit, every task reports the requeue status without ever writing
    a checkpoint, so the job must fail with the guard's message instead of requeueing
    forever."""
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-m" ]; then  # -m launch.slurm_task train CONFIG: "checkpoint" nothing\n'
        '    out="$(dirname "$4")"\n'
        '    trap \'echo "{\\"exit_code\\": 42}" > "$out/exit.json"; exit 1\' TERM\n'
        '    touch "$out/started"\n'
        "    while true; do sleep 0.2; done\n"
        "fi\n"
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    stand_in.chmod(0o755)
    run_dir = tmp_path / "run"
    args = launch_args(corpus, run_dir, "cluster.launch_mode=srun", f"cluster.python={stand_in}")
    result = kiln_launch(args, tmp_path, slurm_cluster.env())
    assert result.returncode == 0, result.stderr[-3000:]
    job = submitted_job(run_dir)
    wait_for((run_dir / "started").is_file, 60, "the tasks")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    assert slurm_cluster.wait(job, timeout=120) == "FAILED"
    log = log_text(run_dir)
    assert "exit status 42" in log and "forward-progress guard" in log
    assert "requeueing job" not in log
    assert "Restarts=0" in slurm_cluster.run("scontrol", "show", "job", str(job)).stdout


def test_multirun_submits_one_job_per_sweep_point(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "sweep"
    args = launch_args(corpus, run_dir, "trainer.max_steps=4", "launch.wait=true",
                       "optim.lr=1e-3,2e-3")  # fmt: skip
    result = kiln_launch(["-m", *args], tmp_path, slurm_cluster.env())
    assert result.returncode == 0, result.stderr[-3000:]
    points = sorted(p.name for p in run_dir.iterdir())
    assert points == ["sweep-0", "sweep-1"]
    jobs = [submitted_job(run_dir / point) for point in points]
    assert len(set(jobs)) == 2 and result.stdout.count("ended: COMPLETED") == 2
    # both points submitted before the wait for either: the sweep's jobs run at once
    said = result.stdout
    assert said.index(f"submitted Slurm job {jobs[1]}") < said.index("ended: COMPLETED")
    assert f"waiting for the sweep's 2 Slurm job(s): {jobs[0]}, {jobs[1]}" in said
    # on one node at once, each job's rendezvous on a port of its own (from its job id)
    for point, job in zip(points, jobs, strict=True):
        assert f"at 127.0.0.1:{20000 + job % 10000}); " in log_text(run_dir / point)
    for point, lr in zip(points, ("0.001", "0.002"), strict=True):
        config = (run_dir / point / "config.yaml").read_text()
        assert f"  lr: {lr}\n" in config and f"run_name: default-{point[-1]}\n" in config
        assert sorted(losses(run_dir / point)) == [1, 2, 3, 4]
        command = (run_dir / point / "command.txt").read_text().splitlines()
        assert command[2] == "# this sweep point's overrides"
        assert f" optim.lr={lr} " in command[3] and ",2e-3" not in command[3]


def test_a_waited_sweep_fails_if_one_of_its_jobs_did_not_complete(
    slurm_cluster, corpus: Path, tmp_path: Path
) -> None:
    """`kiln launch -m ... launch.wait=true` with a stand-in for the trainer (cluster.python)
    that fails the second point's task: both jobs are waited for, each reported, and the
    launch exits 1."""
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-m" ]; then  # -m launch.slurm_task train RUN_DIR/sweep-N/config.pkl\n'
        '    case "$4" in */sweep-1/*) exit 3;; esac; exit 0\n'
        "fi\n"
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    stand_in.chmod(0o755)
    run_dir = tmp_path / "sweep"
    args = launch_args(corpus, run_dir, "cluster.launch_mode=srun", f"cluster.python={stand_in}",
                       "launch.wait=true", "optim.lr=1e-3,2e-3")  # fmt: skip
    result = kiln_launch(["-m", *args], tmp_path, slurm_cluster.env())
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    ok, failed = (submitted_job(run_dir / f"sweep-{n}") for n in (0, 1))
    assert f"job {ok} ended: COMPLETED" in result.stdout
    assert f"job {failed} ended: FAILED" in result.stdout


def test_data_job_builds_shards_on_slurm(slurm_cluster, tmp_path: Path) -> None:
    """`job=data`: the data pipeline as a one-task Slurm job (a Ray of its own inside it)."""
    out = tmp_path / "data"
    args = [
        "cluster=slurm", "cluster.accelerator=cpu", "cluster.cpus_per_task=2", "job=data",
        "corpus=stdlib", "corpus.sources.0.paths=[stdlib/json,stdlib/email]",
        "tokenizer.vocab_size=1000", f"output_dir={out}", "launch.wait=true",
    ]  # fmt: skip
    result = kiln_launch(args, tmp_path, slurm_cluster.env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "ended: COMPLETED" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 1000 and manifest["shards"]
    assert (out / "launch" / "config.yaml").is_file()
    assert "launch.slurm_task data" in (out / "launch" / "slurm" / "job.sbatch").read_text()
