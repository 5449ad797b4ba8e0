"""`kiln launch`: run the same resolved config as a train or data job on `cluster=local`,
`slurm` or `ray`.

Every launch first writes, into its launch directory (the run directory for `job=train`,
`OUTPUT_DIR/launch` for `job=data`):

- `config.yaml` (the fully resolved config, for people) and `config.pkl` (what the job loads);
- `command.txt`: the `kiln launch ...` command line as typed, and the exact command the
  launcher runs or submits (torchrun, sbatch, or the Ray Train job).

Then the cluster kind's launcher takes over (`launch/local.py`, `launch/slurm.py`,
`launch/ray_launcher.py`); each returns a process exit status.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any


def launch_directory(cfg: Any) -> Path:
    """Where a launch records its config and command (and, on Slurm, its script and logs)."""
    if cfg.job == "data":
        return Path(cfg.output_dir) / "launch"
    return Path(cfg.trainer.run_dir)


def invoked_command() -> str:
    """The `kiln launch ...` command line of this process, shell-quoted."""
    args = sys.argv[1:]
    return shlex.join(["kiln", "launch", *args])


def write_config(cfg: Any, directory: Path) -> Path:
    """config.yaml and config.pkl in `directory`; returns the pickle's path."""
    from pretrain.train import write_run_config

    return write_run_config(cfg, directory)


def write_command(directory: Path, command: list[str] | str, note: str = "") -> Path:
    """command.txt: how this launch was invoked and the exact command it runs."""
    runs = command if isinstance(command, str) else shlex.join(command)
    point = ""
    if in_multirun():  # the invocation holds the whole sweep: this point's own overrides
        from hydra.core.hydra_config import HydraConfig

        point = f"# this sweep point's overrides\n{shlex.join(HydraConfig.get().overrides.task)}\n"
    text = (f"# invoked\n{invoked_command()}\n{point}"
            f"# runs{f' ({note})' if note else ''}\n{runs}\n")  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "command.txt"
    path.write_text(text)
    return path


def in_multirun() -> bool:
    """Whether this launch is one point of a Hydra multirun (`kiln launch -m`)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # not inside a Hydra app
        return False


def finish_sweep() -> int:
    """After the last point of `kiln launch -m`: wait for the Slurm jobs that the points
    submitted with `launch.wait=true` (all of them running at once, as the cluster allows),
    then exit 1 unless every one completed."""
    slurm = sys.modules.get("launch.slurm")
    jobs = list(getattr(slurm, "SWEEP_JOBS", ()))
    if not jobs:
        return 0
    slurm.SWEEP_JOBS.clear()
    print(f"kiln launch: waiting for the sweep's {len(jobs)} Slurm job(s): {', '.join(jobs)}",
          flush=True)  # fmt: skip
    return slurm.wait_for_jobs(jobs)


def sweep_point(cfg: Any, job: str | None = None) -> None:
    """Under `kiln launch|train|data -m` (Hydra multirun), give each sweep point its own run: run
    directory `RUN_DIR/sweep-N` (data jobs: `OUTPUT_DIR/sweep-N`) and W&B run name
    `RUN_NAME-N`, N being Hydra's job number; the overrides of the point are in its
    config.yaml and command.txt. `job` is what the point runs: `cfg.job` under `kiln launch`,
    the subcommand's own job under `kiln train` and `kiln data`."""
    if not in_multirun():
        return
    from hydra.core.hydra_config import HydraConfig

    number = HydraConfig.get().job.num
    cfg.run_name = f"{cfg.run_name}-{number}"
    if (job or cfg.job) == "data":
        cfg.output_dir = str(Path(cfg.output_dir) / f"sweep-{number}")
    else:
        cfg.trainer.run_dir = str(Path(cfg.trainer.run_dir) / f"sweep-{number}")


def run(cfg: Any) -> int:
    """`kiln launch` entry point: dispatch on `cluster.kind`."""
    sweep_point(cfg)
    kind = type(cfg.cluster).kind
    if kind == "local":
        from launch.local import launch
    elif kind == "slurm":
        from launch.slurm import launch
    elif kind == "ray":
        from launch.ray_launcher import launch
    else:  # pragma: no cover - the config schema defines exactly these kinds
        raise ValueError(f"no launcher for cluster kind {kind!r}")
    return launch(cfg, launch_directory(cfg))
