"""`kiln launch cluster=ray`: a train or data job on a running Ray cluster.

`job=train`: Ray Train's `TorchTrainer` places `cluster.workers` workers (Ray actors) on the
cluster at `cluster.address`, each with `cluster.cpus_per_worker` CPUs and
`cluster.gpus_per_worker` GPUs (0 or 1), sets up the torch process group (gloo on CPU; NCCL
for CUDA tensors plus gloo for the loop's small CPU tensors on GPU) and calls `train_worker`
on every worker. That is kiln's own rank: `pretrain.train.worker(cfg)`, which joins the group
Ray made (`init_distributed` keeps an initialized group; Ray sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT), so the world is the `cluster.workers` Ray workers.

Checkpoints are kiln's (`RUN_DIR/checkpoints`, which every node must see: a shared file
system), not Ray Train's. When a worker dies (its process or its node), Ray Train ends the
worker group and starts a new one, up to `cluster.max_failures` times; the new ranks continue
from `RUN_DIR/checkpoints/latest` (`trainer.resume=auto`, the default), so the run completes
with the same data order as an uninterrupted one. Ray Train's own run state goes to
`cluster.storage_path` (default `RUN_DIR/ray`). Ray workers do not inherit the driver's
environment: the driver's KILN_* and WANDB_* variables are passed to them, and relative paths
(run directory, data, resume, init_from) are made absolute against the directory `kiln launch`
runs in.

The trainer's exit codes on a worker:

- 0 (done): the worker returns; Ray Train reports success.
- 3 (too many non-finite steps in a row; the last good checkpoint is intact): the worker
  returns without an error, so Ray Train does *not* restart the group. A restart would reload
  the same checkpoint and replay the same data and diverge again; this needs a person (a lower
  learning rate, other data). `kiln launch` exits with 3.
- 42 (`REQUEUE_EXIT_CODE`: a stop signal; the trainer saved first): raised as a retryable
  error, so Ray Train restarts the group, which resumes from that checkpoint (a requeue in
  place; it counts against `max_failures`). In practice Ray workers do not see 42: the trainer
  runs in Ray Train's training thread, and Python delivers signals only to a process's main
  thread, which Ray owns, so the trainer's SIGTERM/SIGUSR1 handlers are not installed there
  (see `_thread_stop_signal`); stopping a Ray run is Ray's business (Ctrl-C on `kiln launch`
  aborts it; a preempted node's workers are restarted elsewhere from the checkpoint).
- anything else, or an exception: a retryable error, as for a dead worker.

`kiln launch` returns 0 when the run completed, 3 as above, and otherwise prints what failed
and returns 1 (or 42 when the last attempt ended by a stop signal: "requeue me" for whatever
runs `kiln launch`).

`job=data`: the data pipeline (`data_pipeline.pipeline.run`), driven from this process, with
`ray.address` set to `cluster.address`: its tasks run on the cluster's nodes, which must all
see `output_dir`.

Ray is imported only when a launch runs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.launcher import write_command, write_config
from pretrain.exit_codes import DONE, NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE

FAILED_EXIT_CODE = 1
# Environment variables of the driver passed on to the workers (fault injection in tests,
# W&B settings and key): Ray workers do not inherit the driver's environment.
FORWARDED_ENV_PREFIXES = ("KILN_", "WANDB_")


class RankExit(RuntimeError):
    """A rank's trainer returned a status that asks Ray Train to restart the worker group."""

    def __init__(self, code: int, rank: int | None = None) -> None:
        self.code, self.rank = code, rank
        where = f"rank {rank}" if rank is not None else "a rank"
        reason = (
            "stopped by a signal after saving (requeue)" if code == REQUEUE_EXIT_CODE else "failed"
        )
        super().__init__(f"kiln trainer on {where} exited with {code}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[int, int | None]]:  # Ray pickles errors
        return RankExit, (self.code, self.rank)


class ClusterUnreachable(ConnectionError):
    """`ray.init(address=cluster.address)` failed."""


# --------------------------------------------------------------------------------------------
# Pure parts: the workers' config, the Ray Train settings, the exit-code mapping


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path if _is_url(path) else str(Path(path).expanduser().absolute())


def worker_config(cfg: Any) -> Any:
    """The config every Ray Train worker trains with (also what `config.yaml` records).

    A copy of `cfg` with:
    - `cluster.nodes=1`, `cluster.gpus_per_node=cluster.workers`: kiln counts ranks as
      `nodes x gpus_per_node` (batch checks, `kiln plan`); on Ray the ranks are the workers,
      wherever Ray places them;
    - `cluster.accelerator`: `cuda` with `gpus_per_worker=1`, else `cpu` (a worker without a
      GPU trains on its CPU, with gloo and fp32);
    - the run directory, the data path, an explicit resume path and `trainer.init_from` made
      absolute: workers run in Ray's session directories, not in the directory `kiln launch`
      was started from.
    """
    cfg = copy.deepcopy(cfg)
    cluster = cfg.cluster
    cluster.nodes = 1
    cluster.gpus_per_node = cluster.workers
    cluster.accelerator = "cuda" if cluster.gpus_per_worker > 0 else "cpu"
    cfg.trainer.run_dir = _absolute(cfg.trainer.run_dir)
    cfg.data.path = _absolute(cfg.data.path)
    cfg.output_dir = _absolute(cfg.output_dir)
    if cfg.trainer.resume not in ("auto", "none"):
        cfg.trainer.resume = _absolute(cfg.trainer.resume)
    if cfg.trainer.init_from:
        cfg.trainer.init_from = _absolute(cfg.trainer.init_from)
    return cfg


def check_cluster(cfg: Any) -> None:
    """Settings of `cluster=ray` that cannot work; raises `pretrain.config.ConfigError`."""
    from pretrain.config import ConfigError

    cluster = cfg.cluster
    if cluster.workers < 1:
        raise ConfigError(f"cluster.workers={cluster.workers} must be >= 1")
    if cluster.cpus_per_worker < 0:
        raise ConfigError(f"cluster.cpus_per_worker={cluster.cpus_per_worker} must be >= 0")
    if cluster.gpus_per_worker not in (0, 1):
        raise ConfigError(
            f"cluster.gpus_per_worker={cluster.gpus_per_worker}: a kiln rank drives one device; "
            "use 0 (CPU) or 1 and set cluster.workers to the number of GPUs"
        )
    if cluster.max_failures < -1:
        raise ConfigError(
            f"cluster.max_failures={cluster.max_failures} must be >= -1 (-1: no limit)"
        )


def torch_backend(cfg: Any) -> str:
    """The process group Ray Train creates: what `pretrain.train.init_distributed` would."""
    backend = cfg.engine.backend
    if backend == "auto":
        backend = "nccl" if cfg.cluster.gpus_per_worker > 0 else "gloo"
    # with NCCL, gloo carries the loop's small CPU tensors (stop flags, metric means)
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def worker_env(cfg: Any, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables of every worker: DeepSpeed's CPU accelerator and one OpenMP thread
    per CPU of the worker on CPU clusters, and the driver's KILN_* and WANDB_* variables."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    if cfg.cluster.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, cfg.cluster.cpus_per_worker))
    return env


@dataclass
class TrainJob:
    """Everything `TorchTrainer` is built from: one place for what runs and what is recorded."""

    address: str
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    backend: str
    storage_path: str
    name: str
    max_failures: int
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The Ray Train job as one line of Python, for command.txt (the env's values hidden)."""
        env = {key: "..." if key.startswith("WANDB_") else value for key, value in self.env.items()}
        return (
            f"ray.init(address={self.address!r}); ray.train.torch.TorchTrainer("
            f"train_loop_per_worker=launch.ray_launcher.train_worker, "
            f"train_loop_config={{'cfg': <config.pkl>}}, "
            f"scaling_config=ScalingConfig(num_workers={self.num_workers}, "
            f"use_gpu={self.use_gpu}, resources_per_worker={self.resources_per_worker}), "
            f"torch_config=TorchConfig(backend={self.backend!r}), "
            f"run_config=RunConfig(name={self.name!r}, storage_path={self.storage_path!r}, "
            f"failure_config=FailureConfig(max_failures={self.max_failures}), "
            f"worker_runtime_env={{'env_vars': {env}}})).fit()"
            " # each worker: pretrain.train.worker(cfg)"
        )


def train_job(cfg: Any, environ: dict[str, str] | None = None) -> TrainJob:
    """The Ray Train job for a worker config (`worker_config(cfg)`)."""
    cluster = cfg.cluster
    resources: dict[str, float] = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker:
        resources["GPU"] = cluster.gpus_per_worker
    storage = cluster.storage_path or str(Path(cfg.trainer.run_dir) / "ray")
    return TrainJob(
        address=cluster.address,
        num_workers=cluster.workers,
        use_gpu=cluster.gpus_per_worker > 0,
        resources_per_worker=resources,
        backend=torch_backend(cfg),
        storage_path=_absolute(storage),
        name=cfg.run_name,
        max_failures=cluster.max_failures,
        env=worker_env(cfg, environ),
    )


def check_rank_exit(code: int, rank: int | None = None) -> None:
    """On a worker, after the trainer returned `code`: return for 0 and 3 (no restart), raise
    `RankExit` (Ray Train restarts the worker group) for 42 and anything else."""
    if code in (DONE, NONFINITE_EXIT_CODE):
        return
    raise RankExit(code, rank)


def launch_exit_code(record: dict | None, error: BaseException | None) -> tuple[int, str]:
    """`kiln launch`'s status and message from rank 0's `exit.json` record (None when absent)
    and the error `fit()` raised (None when it returned)."""
    recorded = None if record is None else int(record.get("exit_code", FAILED_EXIT_CODE))
    if error is None:
        if recorded == DONE:
            return DONE, f"run completed at step {record.get('step')}"
        if recorded == NONFINITE_EXIT_CODE:
            return NONFINITE_EXIT_CODE, (
                f"training stopped at step {record.get('step')} after "
                f"{record.get('nonfinite_steps')} non-finite steps (too many in a row); the last "
                "good checkpoint is kept, and Ray Train did not restart the run (it would "
                "diverge again)"
            )
        return FAILED_EXIT_CODE, "the workers finished but rank 0 recorded no exit status"
    if recorded == REQUEUE_EXIT_CODE:
        return REQUEUE_EXIT_CODE, (
            f"the last attempt stopped on a signal after saving at step {record.get('step')} "
            f"and Ray Train gave up ({error}); rerun the same command to continue"
        )
    return FAILED_EXIT_CODE, f"training failed: {error}"


# --------------------------------------------------------------------------------------------
# On the workers


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: kiln's rank `ray.train.get_context().get_world_rank()`."""
    import ray.train

    from pretrain.train import worker

    cfg = config["cfg"]
    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())  # Ray V2 sets it too; V1 later
    if cfg.cluster.accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    # Ray Train V2 runs this in a thread: the trainer's StopSignal then installs no signal
    # handlers (only a main thread may) and keeps its per-step collective
    code = worker(cfg, one_line_errors=False)  # the error reaches `kiln launch` via Ray
    check_rank_exit(code, context.get_world_rank())


# --------------------------------------------------------------------------------------------
# The driver


def launch(cfg: Any, directory: Path) -> int:
    if cfg.job == "data":
        return launch_data(cfg, directory)
    return launch_train(cfg, directory)


def launch_data(cfg: Any, directory: Path) -> int:
    """The data pipeline, driven from this process, with its tasks on the cluster."""
    from data_pipeline.pipeline import run as run_data

    cfg.ray.address = cfg.cluster.address
    write_config(cfg, directory)
    write_command(
        directory,
        f"data_pipeline.pipeline.run(cfg) with ray.address={cfg.cluster.address!r}",
        note="the data pipeline in the kiln process, its Ray tasks on the cluster",
    )
    return run_data(cfg) or 0


def _say(message: str) -> None:
    print(f"kiln launch cluster=ray: {message}", file=sys.stderr, flush=True)


def launch_train(cfg: Any, directory: Path) -> int:
    from pretrain.config import ConfigError, validate_config

    try:
        check_cluster(cfg)
        cfg = worker_config(cfg)
        validate_config(cfg)  # again, now that the ranks are the workers
    except ConfigError as error:
        _say(f"config error: {error} (on Ray the ranks are the cluster.workers)")
        return FAILED_EXIT_CODE
    job = train_job(cfg)
    run_dir = Path(cfg.trainer.run_dir)
    write_config(cfg, directory)
    write_command(directory, job.describe(),
                  note=f"Ray Train, {job.num_workers} workers on the cluster at {job.address}")  # fmt: skip
    if cfg.trainer.resume != "auto" and job.max_failures != 0:
        _say(f"trainer.resume={cfg.trainer.resume}: a restarted worker group resumes from that "
             "again, not from the latest checkpoint; use trainer.resume=auto")  # fmt: skip
    exit_file = run_dir / "exit.json"
    exit_file.unlink(missing_ok=True)
    try:
        error = _fit(job, cfg)
    except ClusterUnreachable as failure:
        _say(f"cannot join the Ray cluster at cluster.address={job.address}: {failure}")
        return FAILED_EXIT_CODE
    record = json.loads(exit_file.read_text()) if exit_file.is_file() else None
    code, message = launch_exit_code(record, error)
    _say(message)
    return code


def _fit(job: TrainJob, cfg: Any) -> BaseException | None:
    """Run the job on the cluster; returns the error Ray Train gave up with, or None."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline.ray_address import unreachable

    started = False
    if not ray.is_initialized():
        problem = unreachable(job.address)
        if problem:
            raise ClusterUnreachable(problem)
        try:
            ray.init(address=job.address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterUnreachable(str(error)) from error
        started = True
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"cfg": cfg},
            scaling_config=ScalingConfig(
                num_workers=job.num_workers,
                use_gpu=job.use_gpu,
                resources_per_worker=job.resources_per_worker,
            ),
            torch_config=TorchConfig(backend=job.backend),
            run_config=RunConfig(
                name=job.name,
                storage_path=job.storage_path,
                failure_config=FailureConfig(max_failures=job.max_failures),
                worker_runtime_env={"env_vars": job.env},
            ),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as error:
            return error
        return None
    finally:
        if started:
            ray.shutdown()
