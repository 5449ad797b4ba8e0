"""`kiln launch cluster=ray` on a real two-node Ray cluster on 127.0.0.1 (a head and one more
node, one CPU each, started for this module), end to end as users run it: a data build whose
tasks run on the cluster, a 2-worker Ray Train run (DDP, gloo on CPU) of the tiny decoder on
that data, and the same run with one worker SIGKILLed after the first checkpoint: Ray Train
restarts the worker group, the ranks resume from the checkpoint, and the losses are bitwise
those of the uninterrupted run. Then what must not start or not restart (a run the cluster
cannot hold, a missing data path, a data error on the workers) and Ctrl-C (mid-run, and while
Ray Train waits for resources another job holds). Before them, the pure parts of the launcher:
the workers' config, the Ray Train job, the exit-code mapping.

The module has its own head (not the session's `ray_head`): the extra node would stay listed
(dead) in the session head's `ray.nodes()` after it stops.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from services import RayHead, RayHeadError, RayNode

from launch.ray_launcher import (
    CLEANER_NOISE,
    REQUEUE_EXIT_CODE,
    RankExit,
    RankUserError,
    check_cluster,
    check_rank_exit,
    launch_exit_code,
    placement_problem,
    rank_user_error,
    torch_backend,
    train_job,
    worker_config,
)
from pretrain.config import ConfigError, KilnConfig, build_config, register_configs

KILN = Path(sys.executable).parent / "kiln"
MAX_STEPS = 12
ray_cluster = pytest.mark.ray


# --------------------------------------------------------------------------------------------
# The pure parts


@pytest.fixture(scope="module")
def launch_config() -> Iterator[Callable[..., KilnConfig]]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield lambda *overrides: build_config(
            compose("launch", overrides=["cluster=ray", *overrides])
        )


def test_worker_config_counts_the_workers_as_ranks_and_makes_paths_absolute(
    launch_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = launch_config("cluster.workers=4", "trainer.run_dir=runs/a", "data.path=out/data",
                        "trainer.resume=runs/old/checkpoints/step_00000004",
                        "trainer.init_from=out/hf")  # fmt: skip
    workers = worker_config(cfg)
    assert (workers.cluster.nodes, workers.cluster.gpus_per_node) == (1, 4)
    assert workers.cluster.accelerator == "cpu"  # gpus_per_worker=0
    assert workers.trainer.run_dir == str(tmp_path / "runs/a")
    assert workers.data.path == str(tmp_path / "out/data")
    assert workers.trainer.resume == str(tmp_path / "runs/old/checkpoints/step_00000004")
    assert workers.trainer.init_from == str(tmp_path / "out/hf")
    # the caller's config is left alone
    assert (cfg.cluster.gpus_per_node, cfg.trainer.run_dir) == (4, "runs/a")  # = workers
    gpu = worker_config(launch_config("cluster.gpus_per_worker=1", "data.path=s3://b/data"))
    assert gpu.cluster.accelerator == "cuda" and gpu.data.path == "s3://b/data"
    assert gpu.trainer.resume == "auto"


def test_train_job_resources_storage_backend_and_worker_environment(launch_config) -> None:
    cfg = worker_config(launch_config("cluster.workers=3", "cluster.cpus_per_worker=2",
                                      "data.global_batch_size=24", "trainer.run_dir=/shared/run",
                                      "run_name=r1",
                                      "cluster.max_failures=5"))  # fmt: skip
    environ = {"KILN_FAULT_NAN_STEPS": "3", "WANDB_API_KEY": "secret", "HOME": "/root"}
    job = train_job(cfg, environ)
    assert (job.num_workers, job.use_gpu, job.resources_per_worker) == (3, False, {"CPU": 2})
    assert (job.storage_path, job.name, job.max_failures) == ("/shared/run/ray", "r1", 5)
    assert job.backend == "gloo"
    # Ray Train's print patch off: it printed each line of rank 0 twice
    assert job.env == {"KILN_FAULT_NAN_STEPS": "3", "WANDB_API_KEY": "secret",
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2",
                       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # fmt: skip
    described = job.describe()
    assert "TorchTrainer(" in described and "num_workers=3" in described
    # a worker group that cannot start is retried as often as a failed one, not without end
    assert "FailureConfig(max_failures=5, controller_failure_limit=5)" in described
    assert "secret" not in described and "'WANDB_API_KEY': '...'" in described
    gpu = worker_config(launch_config("cluster.gpus_per_worker=1", "cluster.storage_path=/s"))
    gpu_job = train_job(gpu, {})
    assert gpu_job.resources_per_worker == {"CPU": 1, "GPU": 1} and gpu_job.use_gpu
    assert gpu_job.storage_path == "/s" and gpu_job.env == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert torch_backend(gpu) == "cpu:gloo,cuda:nccl"  # gloo for the loop's CPU tensors
    assert torch_backend(worker_config(launch_config("engine.backend=gloo"))) == "gloo"


def test_exit_codes_on_the_workers_and_of_kiln_launch() -> None:
    check_rank_exit(0)
    check_rank_exit(3)  # diverged: not restarted, it would diverge again
    for code in (REQUEUE_EXIT_CODE, 1, -9):
        with pytest.raises(RankExit) as raised:
            check_rank_exit(code, rank=1)
        assert raised.value.code == code and "rank 1" in str(raised.value)
        copy = pickle.loads(pickle.dumps(raised.value))  # as Ray ships it to the driver
        assert (copy.code, str(copy)) == (code, str(raised.value))
    assert launch_exit_code({"exit_code": 0, "step": 12}, None)[0] == 0
    code, message = launch_exit_code({"exit_code": 3, "step": 7, "nonfinite_steps": 5}, None)
    assert code == 3 and "non-finite" in message
    assert launch_exit_code(None, None)[0] == 1
    failed = RuntimeError("Training failed due to worker errors")
    assert launch_exit_code({"exit_code": 0, "step": 4}, failed) == (
        1, "training failed: Training failed due to worker errors")  # fmt: skip
    assert launch_exit_code({"exit_code": 42, "step": 4}, failed)[0] == REQUEUE_EXIT_CODE


def test_a_rank_user_error_reaches_kiln_launch_as_its_one_line() -> None:
    from ray.train import ControllerError

    error = RankUserError("shard /d/s.tar: 10 bytes, the manifest says 20", rank=1)
    assert str(error) == "rank 1: shard /d/s.tar: 10 bytes, the manifest says 20"
    # as `stop_on_user_errors` raises it on the controller and Ray ships it to the driver
    shipped = pickle.loads(pickle.dumps(ControllerError(error)))
    assert str(rank_user_error(shipped)) == str(error)
    assert rank_user_error(ControllerError(RuntimeError("other"))) is None
    assert rank_user_error(None) is None


def test_a_worker_group_the_cluster_cannot_hold_is_named_with_its_numbers() -> None:
    two_nodes = [{"CPU": 1.0, "memory": 2e9}, {"CPU": 1.0, "memory": 2e9}]
    assert placement_problem(2, {"CPU": 1}, two_nodes) is None
    assert placement_problem(3, {"CPU": 1}, two_nodes) == (
        "cluster.workers=3 workers of 1 CPU each need 3 CPU, and the cluster has 2 CPU on its "
        "2 node(s)")  # fmt: skip
    assert placement_problem(2, {"CPU": 1, "GPU": 1}, two_nodes) == (
        "cluster.workers=2 workers of 1 CPU, 1 GPU each need 2 GPU, and the cluster has 0 GPU "
        "on its 2 node(s)")  # fmt: skip
    # enough CPUs in all, but a worker's must be on one node
    assert placement_problem(2, {"CPU": 2}, [{"CPU": 3.0}, {"CPU": 1.0}]) == (
        "cluster.workers=2 workers of 2 CPU each: a worker's resources must be on one node, and "
        "the cluster's 2 node(s) hold only 1 of them")  # fmt: skip
    assert placement_problem(16, {"CPU": 4, "GPU": 1}, [{"CPU": 32.0, "GPU": 8.0}] * 2) is None
    assert placement_problem(4, {"CPU": 0}, []) is None  # asks for nothing


def test_settings_that_cannot_work_fail_before_joining_a_cluster(
    launch_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="gpus_per_worker=2"):
        check_cluster(launch_config("cluster.gpus_per_worker=2"))
    # 3 workers do not divide the global batch: refused when the config is composed
    with pytest.raises(ConfigError, match="3 data-parallel ranks"):
        launch_config("cluster.workers=3", "data.global_batch_size=16", "data.micro_batch_size=2")
    assert not (tmp_path / "run").exists()  # nothing was written


def test_an_address_where_no_cluster_runs_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """ray.init given a host:port where nothing listens retried for minutes, printing Ray's
    "Failed to get cluster ID" every 35 s; kiln launch and kiln data now say so at once."""
    import socket

    from data_pipeline.ray_address import unreachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert unreachable(f"127.0.0.1:{port}") is None
        assert unreachable(f"ray://127.0.0.1:{port}") is None
    assert unreachable("auto") is None and unreachable(None) is None
    said = (f"nothing listens at 127.0.0.1:{port} (Connection refused): start the cluster "
            f"there (`ray start --head --port={port}` on its head node) or correct the address")  # fmt: skip
    assert unreachable(f"127.0.0.1:{port}") == said

    launch = subprocess.run([str(KILN), "launch", "cluster=ray", f"cluster.address=127.0.0.1:{port}",
                             f"trainer.run_dir={tmp_path / 'run'}", "logger=none"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert launch.returncode == 1
    assert launch.stderr.strip().splitlines()[-1] == (
        f"kiln launch cluster=ray: cannot join the Ray cluster at cluster.address=127.0.0.1:{port}:"
        f" {said}"
    ), launch.stderr[-3000:]
    data = subprocess.run([str(KILN), "data", f"ray.address=127.0.0.1:{port}",
                           f"output_dir={tmp_path / 'data'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert data.returncode == 1
    assert data.stderr.strip().splitlines()[-1] == (
        f"kiln data: cannot join Ray at ray.address=127.0.0.1:{port}: {said}"
    ), data.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# On a two-node cluster


class Cluster:
    def __init__(self, head: RayHead, node: RayNode) -> None:
        self.head, self.node = head, node

    def env(self) -> dict[str, str]:
        return self.head.env() | {"HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and one more node on 127.0.0.1, one CPU each: two 1-CPU workers land one per node."""
    head = RayHead(num_cpus=1)
    node = None
    try:
        head.start()
        node = RayNode(head.address, num_cpus=1).start()
        _wait_for_nodes(head.address, 2)
    except RayHeadError as error:
        if node is not None:
            node.stop()
        head.stop()
        pytest.fail(f"could not start the two-node Ray test cluster: {error}", pytrace=False)
    yield Cluster(head, node)
    node.stop()
    head.stop()


def _wait_for_nodes(address: str, count: int, timeout: float = 30.0) -> None:
    import ray

    ray.init(address=address, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout
        while sum(n["Alive"] for n in ray.nodes()) < count:
            if time.monotonic() > deadline:
                raise RayHeadError(f"{count} nodes not alive after {timeout:.0f}s: {ray.nodes()}")
            time.sleep(0.2)
    finally:
        ray.shutdown()


def kiln_launch(cluster: Cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KILN), "launch", "cluster=ray", f"cluster.address={cluster.head.address}",
                           *args], cwd=cwd, env=cluster.env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _as_a_terminal_starts_it() -> None:
    """Ctrl-C's default action in the child: a pytest-xdist worker ignores SIGINT, and a process
    started with SIGINT ignored keeps ignoring it (Python installs no handler then)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Launch:
    """`kiln launch cluster=ray ARGS` in the background, its output (stdout and stderr together)
    collected as it comes."""

    def __init__(self, cluster: Cluster, args: list[str], cwd: Path) -> None:
        self.process = subprocess.Popen([str(KILN), "launch", "cluster=ray",
                                         f"cluster.address={cluster.head.address}", *args],
                                        cwd=cwd, env=cluster.env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=_as_a_terminal_starts_it)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s: {self.output()}"
            time.sleep(0.05)

    def said(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in line for line in self.lines)

    def finish(self, timeout: float) -> str:
        self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return self.output()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def replaced(args: list[str], *overrides: str) -> list[str]:
    """`args` with each key of `overrides` set to the value there."""
    keys = {override.split("=", 1)[0] for override in overrides}
    return [arg for arg in args if arg.split("=", 1)[0] not in keys] + list(overrides)


@pytest.fixture(scope="module")
def data_build(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`kiln launch cluster=ray job=data`: the json package of the stdlib -> an 800-piece
    tokenizer -> shards, its tasks on both nodes."""
    out = tmp_path_factory.mktemp("data") / "out"
    result = kiln_launch(cluster, "job=data", f"output_dir={out}",
                         "corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=800",
                         "shards.target_bytes=65536", "shards.block_tokens=4096",
                         cwd=out.parent)  # fmt: skip
    return out, result


def train_args(data: Path, run_dir: Path) -> list[str]:
    # ~0.25 s a step on this 2-core machine: a kill after the first checkpoint (step 4) lands
    # well before the end
    return [
        "cluster.workers=2", "model=tiny_decoder", "objective=clm", "engine=ddp", "data=small",
        f"data.path={data}", "data.seq_len=128", "data.global_batch_size=32",
        "data.micro_batch_size=4", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
        f"trainer.max_steps={MAX_STEPS}", "trainer.checkpoint_every=4", "trainer.eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none", "logger.log_every=1",
        "run_name=ray_test",
    ]  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of every step (a step run twice, before and after a restart: the last)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference_run(
    cluster: Cluster, data_build: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:  # fmt: skip
    """An uninterrupted 2-worker run on the data of the data build."""
    out, built = data_build
    assert built.returncode == 0, built.stderr[-3000:]
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, kiln_launch(cluster, *train_args(out, run_dir), cwd=run_dir.parent)


@ray_cluster
def test_data_job_builds_the_shards_on_the_cluster(data_build, cluster: Cluster) -> None:
    out, result = data_build
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["split"] for s in manifest["shards"]} == {"train", "val"}
    assert all((out / s["path"]).is_file() for s in manifest["shards"])
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["workers"] == 2  # the CPUs of both nodes
    config = yaml.safe_load((out / "launch" / "config.yaml").read_text())
    assert config["job"] == "data" and config["ray"]["address"] == cluster.head.address
    command = (out / "launch" / "command.txt").read_text()
    assert "kiln launch cluster=ray" in command and "job=data" in command
    assert f"ray.address='{cluster.head.address}'" in command


@ray_cluster
@pytest.mark.slow
def test_train_job_runs_two_workers_to_completion(reference_run) -> None:
    run_dir, result = reference_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kiln launch cluster=ray: run completed at step 12" in result.stderr
    records = metrics(run_dir)
    [start] = [r for r in records if r.get("event") == "start"]
    assert start["world_size"] == 2 and start["resumed_from"] is None
    assert start["peak_tflops"] == 0.1  # the MFU of CPU workers: not against an H100's 989
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert json.loads((run_dir / "exit.json").read_text())["exit_code"] == 0
    # each line of rank 0 once (Ray Train's print patch printed it twice), and none of the
    # PlacementGroupCleaner's, which asks a State API this head (no dashboard) does not have
    output = (result.stdout + result.stderr).splitlines()
    assert len([line for line in output if f"step {MAX_STEPS} | train | loss" in line]) == 1
    assert len([line for line in output if "kiln train: sample after" in line]) == 1
    assert not [line for line in output if CLEANER_NOISE in line]
    assert (run_dir / "final" / "model.safetensors").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["cluster"]["workers"] == 2 and config["cluster"]["gpus_per_node"] == 2
    assert config["cluster"]["accelerator"] == "cpu"
    assert config["trainer"]["run_dir"] == str(run_dir)
    command = (run_dir / "command.txt").read_text()
    assert "kiln launch cluster=ray" in command and "cluster.workers=2" in command
    assert "TorchTrainer(" in command and "num_workers=2" in command
    assert f"storage_path='{run_dir / 'ray'}'" in command
    assert (run_dir / "ray" / "ray_test").is_dir()  # Ray Train's run state


@ray_cluster
@pytest.mark.slow
def test_killed_worker_is_restarted_and_resumes_from_the_checkpoint(
    cluster: Cluster, data_build, reference_run, tmp_path: Path
) -> None:
    reference_dir, reference = reference_run
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "run"
    process = subprocess.Popen([str(KILN), "launch", "cluster=ray",
                                f"cluster.address={cluster.head.address}",
                                *train_args(data_build[0], run_dir)], cwd=tmp_path,
                               env=cluster.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").exists():
            assert process.poll() is None, process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
        # the train worker on the second node (one 1-CPU worker per node)
        [victim] = cluster.node.worker_pids("ray::RayTrainWorker")
        os.kill(victim, signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-4000:]
    records = metrics(run_dir)
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["resumed_from"] is None
    assert starts[1]["resumed_from"].startswith(str(run_dir / "checkpoints" / "step_"))
    resumed_at = int(starts[1]["resumed_from"].rsplit("_", 1)[1])
    assert 4 <= resumed_at < MAX_STEPS and starts[1]["step"] == resumed_at
    # killed mid-run: the first attempt never reached the last step
    first_attempt = records[: records.index(starts[1])]
    assert max(r["step"] for r in first_attempt if r["kind"] == "train") < MAX_STEPS
    ours, theirs = losses(run_dir), losses(reference_dir)
    assert sorted(ours) == list(range(1, MAX_STEPS + 1))
    assert ours == theirs  # bitwise: same data order, same RNG state, same reductions
    assert json.loads((run_dir / "exit.json").read_text())["exit_code"] == 0
    assert (run_dir / "final" / "model.safetensors").is_file()


@ray_cluster
@pytest.mark.slow
def test_diverged_run_stops_with_status_3_and_is_not_restarted(
    cluster: Cluster, data_build, tmp_path: Path
) -> None:
    """Non-finite losses at steps 1-5 (fault injection; the driver's KILN_* variables reach the
    workers): the trainer stops after 5 in a row with exit 3, which Ray Train must not retry."""
    run_dir = tmp_path / "run"
    args = [f"cluster.address={cluster.head.address}", *train_args(data_build[0], run_dir)]
    result = subprocess.run([str(KILN), "launch", "cluster=ray", *args], cwd=tmp_path,
                            env=cluster.env() | {"KILN_FAULT_NAN_STEPS": "1,2,3,4,5"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 3, result.stderr[-4000:]
    assert "non-finite" in result.stderr and "did not restart" in result.stderr
    records = metrics(run_dir)
    assert len([r for r in records if r.get("event") == "start"]) == 1  # no restart
    [stopped] = [r for r in records if r.get("event") == "stopped"]
    assert stopped["step"] == 5
    assert json.loads((run_dir / "exit.json").read_text()) == {
        "exit_code": 3, "step": 5, "nonfinite_steps": 5}  # fmt: skip


@ray_cluster
def test_a_missing_data_path_is_one_line_before_anything_starts(
    cluster: Cluster, tmp_path: Path
) -> None:
    """kiln train's preflight: a typo'd data.path ran 4 worker groups (max_failures=3) and
    printed 375 lines of tracebacks in 1m38s."""
    typo, run_dir = tmp_path / "dta", tmp_path / "run"
    result = kiln_launch(cluster, *train_args(typo, run_dir), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"kiln launch cluster=ray: {typo / 'manifest.json'}: no manifest (run `kiln data "
        f"output_dir={typo}` first)"
    ]
    assert not run_dir.exists()  # nor was anything written


@ray_cluster
def test_a_run_the_cluster_cannot_hold_is_refused_before_ray_train_starts(
    cluster: Cluster, data_build, tmp_path: Path
) -> None:
    """3 workers of 1 CPU on two 1-CPU nodes: Ray Train waited for them without end (60 s a
    try, a traceback each), and Ctrl-C did not stop it."""
    out, built = data_build
    assert built.returncode == 0, built.stderr[-3000:]
    args = replaced(train_args(out, tmp_path / "run"), "cluster.workers=3",
                    "data.global_batch_size=24")  # fmt: skip
    result = kiln_launch(cluster, *args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "kiln launch cluster=ray: cluster.workers=3 workers of 1 CPU each need 3 CPU, and the "
        "cluster has 2 CPU on its 2 node(s): lower cluster.workers, cluster.cpus_per_worker or "
        "cluster.gpus_per_worker, or start more nodes first (the nodes alive now count, not "
        "those an autoscaler could add)"
    )
    assert "TrainController" not in result.stdout + result.stderr  # Ray Train never started


@ray_cluster
@pytest.mark.slow
def test_a_data_error_on_the_workers_ends_the_run_in_one_line_without_a_restart(
    cluster: Cluster, data_build, tmp_path: Path
) -> None:
    """A shard cut short after the build (preflight reads only the manifest; every rank checks
    the shards' sizes at its start): Ray Train restarted the worker group max_failures times."""
    out, built = data_build
    assert built.returncode == 0, built.stderr[-3000:]
    data = tmp_path / "data"
    shutil.copytree(out, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = next(s for s in manifest["shards"] if s["split"] == "train")
    cut = shard["bytes"] // 2
    with open(data / shard["path"], "r+b") as file:
        file.truncate(cut)
    result = kiln_launch(cluster, *train_args(data, tmp_path / "run"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    said = (f"shard {data / shard['path']}: {cut} bytes, the manifest says {shard['bytes']} "
            "(data.on_bad_shard=skip skips bad shards)")  # fmt: skip
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"kiln launch cluster=ray: rank [01]: " + re.escape(said), last), last
    assert output.count("Attempting to start training worker group") == 1  # no restart


@ray_cluster
@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_names_the_checkpoint_to_resume_from(
    cluster: Cluster, data_build, tmp_path: Path
) -> None:
    """Ray's SIGINT handler ended kiln launch with status 1 after "Gracefully aborting", and
    no line said where the run stood."""
    run_dir = tmp_path / "run"
    launch = Launch(cluster, replaced(train_args(data_build[0], run_dir),
                                      "trainer.max_steps=1000"), cwd=tmp_path)  # fmt: skip
    try:
        launch.wait_until((run_dir / "checkpoints" / "latest").exists, "no checkpoint")
        launch.process.send_signal(signal.SIGINT)
        output = launch.finish(timeout=600)
    finally:
        launch.stop()
    assert launch.process.returncode == 130, output[-4000:]
    from pretrain.preflight import latest_checkpoint

    latest, _ = latest_checkpoint(run_dir)
    assert str(latest).startswith(str(run_dir / "checkpoints" / "step_"))
    assert output.strip().splitlines()[-1] == (
        f"kiln launch: interrupted; the latest checkpoint is {latest} (trainer.resume=auto "
        "continues from it)"
    )
    deadline = time.monotonic() + 120
    while cluster.node.worker_pids("ray::RayTrainWorker") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.node.worker_pids("ray::RayTrainWorker") == []


@ray_cluster
@pytest.mark.slow
def test_sigterm_then_ctrl_c_end_a_launch_waiting_for_resources_another_job_holds(
    cluster: Cluster, data_build, tmp_path: Path
) -> None:
    """The cluster holds the two workers, but another job holds one CPU: Ray Train's controller
    waits for it (60 s a try) without answering. Ray's handler waited for its abort without
    end and ignored a second Ctrl-C; now a second Ctrl-C ends kiln launch at once. A SIGTERM
    (a supervisor stopping the driver) starts the same abort: before, it ended the driver at
    once and left the workers to train on."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=cluster.head.address, logging_level="WARNING")
    launch = None
    try:
        held = placement_group([{"CPU": 1}])
        ray.get(held.ready(), timeout=60)
        launch = Launch(cluster, train_args(data_build[0], tmp_path / "run"), cwd=tmp_path)
        launch.wait_until(launch.said("Attempting to start training worker group"), "no start")
        launch.process.send_signal(signal.SIGTERM)
        launch.wait_until(launch.said("SIGTERM: stopping the workers"), "no abort", timeout=300)
        launch.process.send_signal(signal.SIGINT)  # Ray's handler ignored this one: no end
        output = launch.finish(timeout=600)
        remove_placement_group(held)
    finally:
        if launch is not None:
            launch.stop()
        ray.shutdown()
    assert launch.process.returncode == 143, output[-4000:]
    assert output.strip().splitlines()[-1] == (
        "kiln launch: stopped by SIGTERM; no checkpoint was written yet"
    )
