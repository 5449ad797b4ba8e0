"""What `kiln train` checks in the launching process before it starts any rank (torch-free).

Each rank finds the same problems again, but only after importing torch and joining the process
group, several seconds in, and then every rank fails with its own traceback; here they cost one
line each. Kept to what is on this machine and cheap to read: a remote `data.path` is left to
the ranks, which fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def preflight(cfg: Any) -> list[str]:
    """What would stop every rank of this run at its start, found in the launching process:
    a run directory another run trains in, a CUDA run on a machine without a GPU, checkpoints a run with `trainer.resume=none` would
    overwrite, the shards' manifest (a local `data.path`: present, its tokenizer fits `model.vocab_size`,
    `data.mixture` names its sources), an explicit `trainer.resume` checkpoint, and the
    `trainer.init_from` path of a run that starts afresh."""
    from pretrain.data import remote
    from pretrain.data.manifest import DataError, open_manifest
    from pretrain.run_lock import busy

    problems = []
    in_use = busy(cfg.trainer.run_dir)
    if in_use:
        return [in_use]  # the other checks read what that run is writing
    if cfg.cluster.accelerator == "cuda" and no_gpu():
        problems.append(
            f"cluster.accelerator=cuda ({cfg.cluster.nodes} x {cfg.cluster.gpus_per_node} "
            f"{cfg.cluster.gpu_name}), but torch sees no CUDA device on this machine; on the "
            "CPU use cluster=local_cpu, or experiment=demo for a run sized for it"
        )
    if not remote.is_remote(cfg.data.path):
        try:
            open_manifest(cfg, remote.local_path(cfg.data.path))
        except DataError as error:
            problems.append(str(error))
    problem = resume_problem(cfg.trainer.resume)
    if cfg.trainer.resume == "auto":
        _, problem = latest_checkpoint(cfg.trainer.run_dir)
    elif cfg.trainer.resume == "none":
        problem = checkpoints_in_the_way(cfg.trainer.run_dir)
    if problem:
        problems.append(problem)
    init_from = cfg.trainer.init_from
    if init_from and not Path(init_from).exists() and not _will_resume(cfg):
        problems.append(f"trainer.init_from={init_from} does not exist")
    return problems


def gpu_device_files() -> list[str]:
    """The device files of an NVIDIA (or, under ROCm, AMD; or WSL's) GPU driver on this
    machine, found without importing torch."""
    import glob

    return sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/kfd") + glob.glob("/dev/dxg"))


def no_gpu() -> bool:
    """Whether torch would see no CUDA device here: no driver device file, and (asked only
    then, as importing it takes seconds) torch itself sees none."""
    if gpu_device_files():
        return False
    import torch

    return not torch.cuda.is_available()


def _will_resume(cfg: Any) -> bool:
    """Whether the run continues a checkpoint (trainer.init_from is then not read)."""
    resume = cfg.trainer.resume
    if resume == "auto":
        return (Path(cfg.trainer.run_dir) / "checkpoints" / "latest").is_file()
    return resume != "none"


def latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """(the checkpoint `RUN_DIR/checkpoints/latest` names, None), (None, None) when there is no
    `latest` yet (a new run), or (None, why it cannot be resumed from): a `latest` that names
    no complete checkpoint is damage, not a new run, and starting over would overwrite the
    run's other checkpoints."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None, None
    name = pointer.read_text(errors="replace").strip()
    path = root / name
    if name and (path / "trainer.json").is_file():
        return path, None
    complete = sorted(p for p in root.glob("step_*") if (p / "trainer.json").is_file())
    hint = (
        f"resume from the newest complete one with trainer.resume={complete[-1]}"
        if complete
        else "no complete checkpoint is left"
    )
    return None, (
        f"{pointer} names {name!r}, which holds no trainer.json (damaged or deleted); {hint}, "
        "or start over in a new trainer.run_dir"
    )


def checkpoints_in_the_way(run_dir: str | Path) -> str | None:
    """Why a run that starts afresh (`trainer.resume=none`) cannot train in `run_dir`: its
    checkpoints would be pruned as older than the new run's, `latest` and `final/` overwritten,
    and metrics.jsonl would mix two runs."""
    root = Path(run_dir) / "checkpoints"
    found = sorted(p.name for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    if not found:
        return None
    return (
        f"trainer.resume=none, but {root} holds {len(found)} checkpoint(s) (up to {found[-1]}) "
        "that a new run there would prune and overwrite; continue them with trainer.resume=auto,"
        " start over in a new trainer.run_dir, or delete the directory first"
    )


def resume_problem(resume: str) -> str | None:
    """Why `trainer.resume` cannot be resumed from, or None (`auto`, `none`, or a directory
    holding a checkpoint's trainer.json)."""
    if resume in ("auto", "none") or (Path(resume) / "trainer.json").is_file():
        return None
    return f"trainer.resume={resume}: not a checkpoint directory (no trainer.json there)"
