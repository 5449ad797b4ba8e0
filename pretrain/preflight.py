"""What `kiln train` checks in the launching process before it starts any rank (torch-free).

Each rank finds the same problems again, but only after importing torch and joining the process
group, several seconds in, and then every rank fails with its own traceback; here they cost one
line each. Kept to what is on this machine and cheap to read: a remote `data.path` is left to
the ranks, which fetch it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def preflight(cfg: Any, on_this_machine: bool = True) -> list[str]:
    """What would stop every rank of this run at its start, found in the launching process:
    a run directory another run trains in, a CUDA run on a machine without a GPU (when the
    ranks run `on_this_machine`, not on a cluster's nodes), the shards' manifest (a local
    `data.path`: present, its tokenizer fits `model.vocab_size`, `data.mixture` names its
    sources), the checkpoint to resume (complete; of this engine family and model size),
    checkpoints a run with `trainer.resume=none` would overwrite, and the `trainer.init_from`
    path of a run that starts afresh."""
    from pretrain.data import remote
    from pretrain.data.manifest import DataError, open_manifest
    from pretrain.run_lock import busy

    problems = []
    run_dir = Path(cfg.trainer.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        return [f"trainer.run_dir={run_dir} is a file, not a directory"]
    in_use = busy(cfg.trainer.run_dir)
    if in_use:
        return [in_use]  # the other checks read what that run is writing
    if on_this_machine and cfg.cluster.accelerator == "cuda" and no_gpu():
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
    resume = None if problem or cfg.trainer.resume in ("auto", "none") else cfg.trainer.resume
    if cfg.trainer.resume == "auto":
        resume, problem = latest_checkpoint(cfg.trainer.run_dir)
    elif cfg.trainer.resume == "none":
        problem = checkpoints_in_the_way(cfg.trainer.run_dir)
    if resume is not None:
        problem = resume_mismatch(cfg, Path(resume))
    if problem:
        problems.append(problem)
    init_from = cfg.trainer.init_from
    if init_from and not Path(init_from).exists() and not _will_resume(cfg):
        problems.append(f"trainer.init_from={init_from} does not exist")
    return problems


def nothing_to_train(cfg: Any) -> str | None:
    """The line to say, in place of starting any rank, when the checkpoint this run resumes is
    already at `trainer.max_steps` and `RUN_DIR/final` was written from it: a rerun then
    changes nothing (no config rewritten over the one the steps trained with, no new W&B
    run). Without a current `final/`, the ranks start and write it."""
    import json

    if cfg.trainer.resume == "none":
        return None
    if cfg.trainer.resume == "auto":
        path, _ = latest_checkpoint(cfg.trainer.run_dir)
    else:
        path = Path(cfg.trainer.resume)
    try:
        step = json.loads((Path(path) / "trainer.json").read_text())["step"]  # type: ignore[arg-type]
        final = Path(cfg.trainer.run_dir) / "final"
        written = json.loads((final / "config.json").read_text()).get("step")
    except (TypeError, OSError, ValueError, KeyError):
        return None
    if step < cfg.trainer.max_steps or written != step:
        return None
    return (
        f"{path} is at step {step}, trainer.max_steps={cfg.trainer.max_steps}: nothing to "
        f"train ({final} holds that step; a larger trainer.max_steps trains on)"
    )


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


ENGINE_KINDS = {"ddp": "engine=ddp", "fsdp": "engine=fsdp (or hsdp)",
                "deepspeed": "DeepSpeed (engine=zero1, zero2, zero3)"}  # fmt: skip


def engine_kind(engine: Any) -> str:
    """ "ddp", "fsdp" or "deepspeed": the engine family whose checkpoints `engine` reads."""
    from pretrain.config import DeepSpeedEngineConfig, FSDPEngineConfig

    if isinstance(engine, DeepSpeedEngineConfig):
        return "deepspeed"
    return "fsdp" if isinstance(engine, FSDPEngineConfig) else "ddp"


def resume_mismatch(cfg: Any, path: Path) -> str | None:
    """Why this run cannot continue the checkpoint at `path` (found before any rank starts,
    which would each refuse it, after writing the run's config over the old one): it was
    written by another engine family, or holds a model of another size. Shape differences at
    an equal size, and damage, are left to the ranks' own checks."""
    import json

    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    written = next((kind for kind, mark in (("ddp", "engine.pt"), ("fsdp", "fsdp"),
                                            ("deepspeed", "deepspeed")) if (path / mark).exists()),
                   None)  # fmt: skip
    ours = engine_kind(cfg.engine)
    if written is not None and written != ours:
        return (
            f"{path} was written by {ENGINE_KINDS[written]}, and this run uses "
            f"{ENGINE_KINDS[ours]}: resume it with its engine, or start a new run from its "
            f"weights (trainer.init_from={path} and a new trainer.run_dir)"
        )
    family, model = state.get("model_family"), state.get("model")
    if family is None or not isinstance(model, dict):
        return None  # written before checkpoints recorded their model
    theirs, ours_total = _parameters(family, model), None
    if family == cfg.model.family:
        from pretrain.models.accounting import count_parameters

        ours_total = count_parameters(cfg.model).total
        if theirs is None or theirs == ours_total:
            return None
    import dataclasses

    if family != cfg.model.family:
        differences = [f"a {family} model (now {cfg.model.family})"]
    else:
        differences = config_differences(model, dataclasses.asdict(cfg.model))
    if family == cfg.model.family and theirs is not None:
        differences.insert(0, f"{theirs:,} parameters (now {ours_total:,})")
    return (
        f"{path} holds another model: {'; '.join(differences)}. Resume it with the model it "
        "was trained with, or train this one in a new trainer.run_dir"
    )


def _parameters(family: str, model: dict[str, Any]) -> int | None:
    """The parameter count of a checkpoint's recorded model config, or None if it is not one
    this version reads."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.config import GROUP_SCHEMAS
    from pretrain.models.accounting import count_parameters

    schema = GROUP_SCHEMAS["model"].get(family)
    if schema is None:
        return None
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), model))
    except OmegaConfBaseException:
        return None
    return count_parameters(config).total


def resume_problem(resume: str) -> str | None:
    """Why `trainer.resume` cannot be resumed from, or None (`auto`, `none`, or a directory
    holding a checkpoint's trainer.json)."""
    if resume in ("auto", "none") or (Path(resume) / "trainer.json").is_file():
        return None
    return f"trainer.resume={resume}: not a checkpoint directory (no trainer.json there)"


def config_differences(
    there: dict[str, Any], here: dict[str, Any], prefix: str = "model", current: Any = None
) -> list[str]:
    """`KEY=THERE (now HERE)` for each leaf that differs between two nested config dicts
    (but the model's name). With `current`, the dataclass `here` was made from, a key `there`
    lacks (a setting added to kiln since it was written) at its default is no difference."""
    import dataclasses

    found = []
    for key in sorted(set(there) | set(here), key=str):
        a, b = there.get(key), here.get(key)
        name = f"{prefix}.{key}"
        if name == "model.name":
            continue  # a preset's (or export directory's) label: no weight depends on it
        sub = getattr(current, key, None) if dataclasses.is_dataclass(current) else None
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, name, sub)
        elif key not in there and _at_default(current, key):
            continue
        elif a != b:
            found.append(f"{name}={a} (now {b})")
    return found


def _at_default(obj: Any, key: str) -> bool:
    """Whether dataclass `obj`'s field `key` holds its default."""
    import dataclasses

    if not dataclasses.is_dataclass(obj):
        return False
    for field in dataclasses.fields(obj):
        if field.name == key:
            if field.default is not dataclasses.MISSING:
                return getattr(obj, key) == field.default
            if field.default_factory is not dataclasses.MISSING:
                return getattr(obj, key) == field.default_factory()
    return False
