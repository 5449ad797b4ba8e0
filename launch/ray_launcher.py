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
- a config, data or checkpoint problem (kiln's user errors: `pretrain.train.user_errors`):
  not retried either (a new worker group would meet it again). The worker raises
  `RankUserError` with the problem's one line; on the controller, `stop_on_user_errors` turns
  it into an error Ray Train's failure policy does not retry, and `kiln launch` prints the
  line and exits 1.
- anything else, or an exception: a retryable error, as for a dead worker.

Before any worker starts, `kiln launch` runs `kiln train`'s preflight (run directory, data
manifest, checkpoint to resume: the run directory and a local `data.path` are on a file system
this machine shares with the nodes) and checks that the cluster's nodes, alive now, can hold
`cluster.workers` workers of their CPUs and GPUs at once (`placement_problem`): Ray Train would
otherwise wait for them without end, 60 s a try. Ctrl-C asks Ray Train to stop the workers,
kills its controller after `ABORT_SECONDS` (or a second Ctrl-C), names the checkpoint to
resume from and exits 130. SIGTERM (a scheduler or a supervisor stopping the driver) does the
same and exits 143; without it, the driver would die at once and leave the workers training.

`kiln launch` returns 0 when the run completed, 3 as above, 130 after Ctrl-C, 143 after
SIGTERM, and otherwise
prints what failed and returns 1 (or 42 when the last attempt ended by a stop signal: "requeue
me" for whatever runs `kiln launch`).

`job=data`: the data pipeline (`data_pipeline.pipeline.run`), driven from this process, with
`ray.address` set to `cluster.address`: its tasks run on the cluster's nodes, which must all
see `output_dir`.

Ray is imported only when a launch runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.launcher import write_command, write_config
from pretrain.exit_codes import (
    DONE,
    INTERRUPTED_EXIT_CODE,
    NONFINITE_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
)

FAILED_EXIT_CODE = 1
# Environment variables of the driver passed on to the workers (fault injection in tests,
# W&B settings and key): Ray workers do not inherit the driver's environment.
FORWARDED_ENV_PREFIXES = ("KILN_", "WANDB_")
# Ray Train's print patch sends a worker's print() to a logger (which writes to stderr) and,
# as a Ray worker's sys.stdout is not sys.__stdout__, to stdout too: Ray shows the driver every
# line of rank 0 twice. Without it, print() writes once.
WORKER_RAY_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Ray Train's PlacementGroupCleaner asks the State API every second whether the controller
# lives; where the cluster runs no dashboard (no State API) it logs this each time. The driver
# skips it (Ray's RAY_DEDUP_LOGS_SKIP_REGEX, read when ray is imported).
CLEANER_NOISE = "Failed to query Ray Train Controller actor state"
# How long Ctrl-C waits for Ray Train to stop the workers before it kills the controller, which
# does not answer while it waits for a worker group's resources.
ABORT_SECONDS = 15.0


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


class RankUserError(RuntimeError):
    """A rank's config, data or checkpoint problem: its one line, carried to `kiln launch`
    without a restart of the worker group (a new group would meet it again)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        self.message, self.rank = message, rank
        super().__init__(f"rank {rank}: {message}" if rank is not None else message)

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:  # Ray pickles errors
        return RankUserError, (self.message, self.rank)


class ClusterUnreachable(ConnectionError):
    """`ray.init(address=cluster.address)` failed."""


class ClusterTooSmall(RuntimeError):
    """The cluster's nodes cannot hold the worker group (`placement_problem`)."""


class ControllerDied(RuntimeError):
    """Ray Train's controller actor died under `fit()`."""


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
    per CPU of the worker on CPU clusters, Ray Train's print patch off (`WORKER_RAY_ENV`), and
    the driver's KILN_* and WANDB_* variables."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.update(WORKER_RAY_ENV)
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
            f"failure_config=FailureConfig(max_failures={self.max_failures}, "
            f"controller_failure_limit={self.max_failures}), "
            f"callbacks=[launch.ray_launcher.stop_on_user_errors()], "
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


def placement_problem(
    workers: int, per_worker: dict[str, float], nodes: list[dict[str, float]]
) -> str | None:
    """Why `workers` workers of `per_worker` resources each cannot all be placed at once on
    nodes holding `nodes` (each node's total resources, as `ray.nodes()` lists them), or None.
    A worker's resources must all be on one node."""
    needed = {key: amount for key, amount in per_worker.items() if amount > 0}
    if not needed:
        return None
    each = ", ".join(f"{amount:g} {key}" for key, amount in needed.items())
    totals = {key: sum(node.get(key, 0.0) for node in nodes) for key in needed}
    short = [key for key, amount in needed.items() if totals[key] < workers * amount]
    if short:
        wanted = ", ".join(f"{workers * needed[key]:g} {key}" for key in short)
        held = ", ".join(f"{totals[key]:g} {key}" for key in short)
        return (f"cluster.workers={workers} workers of {each} each need {wanted}, and the "
                f"cluster has {held} on its {len(nodes)} node(s)")  # fmt: skip
    fit = sum(min(int(node.get(key, 0.0) // amount) for key, amount in needed.items())
              for node in nodes)  # fmt: skip
    if fit < workers:
        return (f"cluster.workers={workers} workers of {each} each: a worker's resources must "
                f"be on one node, and the cluster's {len(nodes)} node(s) hold only {fit} of "
                "them")  # fmt: skip
    return None


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


def rank_user_error(error: BaseException | None) -> RankUserError | None:
    """The rank's user error that ended the run, when that is what `fit()` raised: on the
    controller's error (`stop_on_user_errors`), or among the workers' failures."""
    if error is None:
        return None
    failures = getattr(error, "worker_failures", {})
    # Ray Train wraps a worker's exception with its traceback text (in `_base_exc`)
    found = [getattr(error, "controller_failure", None)]
    found += [getattr(failure, "_base_exc", failure) for _, failure in sorted(failures.items())]
    return next((cause for cause in found if isinstance(cause, RankUserError)), None)


def stop_on_user_errors() -> Any:
    """A Ray Train callback, run on the controller: a worker's `RankUserError` ends the run
    instead of restarting the worker group. Raised there as a `ControllerError`, which Ray
    Train's failure policy does not retry (it retries every worker error)."""
    from ray.train import ControllerError, UserCallback

    class StopOnUserErrors(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            for _rank, error in sorted(worker_exceptions.items()):
                cause = getattr(error, "_base_exc", error)
                if isinstance(cause, RankUserError):
                    raise ControllerError(cause)

    return StopOnUserErrors()


# --------------------------------------------------------------------------------------------
# On the workers


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: kiln's rank `ray.train.get_context().get_world_rank()`."""
    import ray.train

    from pretrain.train import one_line, user_errors, worker

    cfg = config["cfg"]
    context = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())  # Ray V2 sets it too; V1 later
    if cfg.cluster.accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    # Ray Train V2 runs this in a thread: the trainer's StopSignal then installs no signal
    # handlers (only a main thread may) and keeps its per-step collective
    try:
        code = worker(cfg, one_line_errors=False)  # the error reaches `kiln launch` via Ray
    except user_errors() as error:
        # its one line, without the trainer's stack (Ray logs the traceback of what is raised)
        raise RankUserError(one_line(error), context.get_world_rank()) from None
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
    """`job=train`: the checks that need no worker, the run's record, then the run."""
    from data_pipeline.ray_address import unreachable
    from pretrain.config import ConfigError, validate_config
    from pretrain.preflight import preflight

    try:
        check_cluster(cfg)
        cfg = worker_config(cfg)
        validate_config(cfg)  # again, now that the ranks are the workers
    except ConfigError as error:
        _say(f"config error: {error} (on Ray the ranks are the cluster.workers)")
        return FAILED_EXIT_CODE
    job = train_job(cfg)
    no_cluster = unreachable(job.address)  # in a second, where ray.init retries for minutes
    if no_cluster:
        _say(f"cannot join the Ray cluster at cluster.address={job.address}: {no_cluster}")
        return FAILED_EXIT_CODE
    # what would stop every worker at its start, said once; the GPUs are the nodes', not ours
    problems = preflight(cfg, on_this_machine=False)
    for problem in problems:
        _say(problem)
    if problems:
        return USER_ERROR_EXIT_CODE
    write_config(cfg, directory)
    write_command(directory, job.describe(),
                  note=f"Ray Train, {job.num_workers} workers on the cluster at {job.address}")  # fmt: skip
    if cfg.trainer.resume != "auto" and job.max_failures != 0:
        _say(f"trainer.resume={cfg.trainer.resume}: a restarted worker group resumes from that "
             "again, not from the latest checkpoint; use trainer.resume=auto")  # fmt: skip
    return run_train(job, cfg)


def run_train(job: TrainJob, cfg: Any) -> int:
    """Run the job and say how it ended, in one line; returns `kiln launch`'s status."""
    from pretrain.train import resume_hint

    run_dir = Path(cfg.trainer.run_dir)
    exit_file = run_dir / "exit.json"
    exit_file.unlink(missing_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _terminated.clear()
    try:
        error = _fit(job, cfg)
    except ClusterUnreachable as failure:
        _say(f"cannot join the Ray cluster at cluster.address={job.address}: {failure}")
        return FAILED_EXIT_CODE
    except ClusterTooSmall as failure:
        _say(f"{failure}: lower cluster.workers, cluster.cpus_per_worker or "
             "cluster.gpus_per_worker, or start more nodes first (the nodes alive now count, "
             "not those an autoscaler could add)")  # fmt: skip
        return FAILED_EXIT_CODE
    except ControllerDied as failure:
        mode = os.environ.get("RAY_AUTH_MODE")
        _say(f"Ray Train's controller actor died ({failure}); check that RAY_AUTH_MODE is the "
             f"cluster's (here {'RAY_AUTH_MODE=' + mode if mode else 'unset'}): a driver "
             "with another can lose its actors this way")  # fmt: skip
        return FAILED_EXIT_CODE
    except KeyboardInterrupt:
        if _terminated:
            print(f"kiln launch: stopped by SIGTERM; {resume_hint(run_dir)}", file=sys.stderr,
                  flush=True)  # fmt: skip
            return TERMINATED_EXIT_CODE
        print(f"kiln launch: interrupted; {resume_hint(run_dir)}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    finally:
        signal.signal(signal.SIGTERM, previous)
    user_error = rank_user_error(error)
    if user_error is not None:  # not retried: its line says it all
        _say(str(user_error))
        return USER_ERROR_EXIT_CODE
    record = json.loads(exit_file.read_text()) if exit_file.is_file() else None
    code, message = launch_exit_code(record, error)
    _say(message)
    return code


def _fit(job: TrainJob, cfg: Any) -> BaseException | None:
    """Run the job on the cluster; returns the error Ray Train gave up with, or None. Raises
    ClusterUnreachable, ClusterTooSmall, ControllerDied, or KeyboardInterrupt after Ctrl-C
    (the workers stopped)."""
    _skip_cleaner_noise()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=job.address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ClusterUnreachable(str(error)) from error
        started = True
    # ray.init installs Ray's fatal-signal handler, which aborts this process at a SIGTERM
    # and leaves the workers training: SIGTERM is kiln's again
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        problem = placement_problem(job.num_workers, job.resources_per_worker, nodes)
        if problem:
            raise ClusterTooSmall(problem)
        trainer = _torch_trainer(
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
                # a worker group that cannot start (its resources taken) is retried as often
                # as a failed one, not without end (Ray's default)
                failure_config=FailureConfig(
                    max_failures=job.max_failures, controller_failure_limit=job.max_failures
                ),
                callbacks=[stop_on_user_errors()],
                worker_runtime_env={"env_vars": job.env},
            ),
        )
        try:
            trainer.fit()
        except KeyboardInterrupt:
            _abort(trainer.controller)
            raise
        except ray.train.TrainingFailedError as error:
            return error
        except ray.exceptions.RayActorError as error:
            raise ControllerDied(_death_reason(error)) from error
        return None
    finally:
        if started:
            ray.shutdown()


class Terminated(KeyboardInterrupt):
    """SIGTERM to `kiln launch`: stopped as Ctrl-C stops it (`_abort`), status 143."""


TERMINATED_EXIT_CODE = 128 + signal.SIGTERM
_terminated: list[bool] = []  # a SIGTERM came (Ray Train may raise a KeyboardInterrupt anew)


def _raise_terminated(_signum: int, _frame: Any) -> None:
    _terminated.append(True)
    raise Terminated


def _skip_cleaner_noise() -> None:
    """Have this driver skip `CLEANER_NOISE` among the lines Ray forwards from the cluster's
    processes (`RAY_DEDUP_LOGS_SKIP_REGEX`, read when ray is first imported)."""
    skip = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if "ray" not in sys.modules and CLEANER_NOISE not in (skip or ""):
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = (
            f"{skip}|{CLEANER_NOISE}" if skip else CLEANER_NOISE
        )


def _torch_trainer(*args: Any, **kwargs: Any) -> Any:
    """Ray Train's `TorchTrainer`, but Ctrl-C is `kiln launch`'s: Ray's SIGINT handler asks the
    controller to abort and waits for it without a limit (as long as the controller waits for
    a worker group's resources: for ever), ignores a second Ctrl-C, and ends the process
    through sys.exit. Here Ctrl-C raises KeyboardInterrupt in `fit()` (Python's own handler,
    which `kiln launch` keeps), and `trainer.controller` is the controller to stop (`_abort`)."""
    from ray.train.torch import TorchTrainer

    class KilnTorchTrainer(TorchTrainer):
        controller: Any = None

        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller

    return KilnTorchTrainer(*args, **kwargs)


def _abort(controller: Any) -> None:
    """After Ctrl-C: ask Ray Train's controller to stop the workers (and its placement group
    cleaner), for up to ABORT_SECONDS or until a second Ctrl-C, then kill it: a controller
    waiting for a worker group's resources does not answer. Its workers and placement group
    end with it; its PlacementGroupCleaner (a detached actor) only where the cluster runs a
    dashboard, whose State API tells it the controller died."""
    import ray

    if controller is None:  # not started yet: ray.shutdown() ends what this driver started
        return
    how = "SIGTERM" if _terminated else "Ctrl-C"
    _say(f"{how}: stopping the workers (up to {ABORT_SECONDS:.0f} s; Ctrl-C again: at once)")
    with contextlib.suppress(KeyboardInterrupt):
        ray.wait([controller.abort.remote()], timeout=ABORT_SECONDS)
    ray.kill(controller)  # nothing to do when the abort ended it


def _death_reason(error: BaseException) -> str:
    """Why an actor died, in a sentence: the first of the cause a RayActorError's message ends
    with (after its header and its tab-indented actor details)."""
    lines = [line.strip() for line in str(error).splitlines() if not line.startswith("\t")]
    reason = ([line for line in lines if line] or [type(error).__name__])[-1]
    return reason.split(". ")[0].rstrip(".")
