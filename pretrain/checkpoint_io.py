"""The consolidated checkpoint: one model's full weights and config in a plain directory.

The trainer writes one when a run ends (and on request); `kiln export` reads it. Unlike the
trainer's sharded, resumable checkpoints it holds no optimizer state and no sharding, so any
process can load it on one CPU. Layout:

    DIR/model.safetensors   our module's state dict (`safetensors.torch.save_model`: a tensor
                            shared by two names, such as tied embeddings, is stored once)
    DIR/config.json         {"format": "kiln-consolidated", "version": 1,
                             "family": "decoder" | "encoder" | "encoder_decoder",
                             "model": dataclasses.asdict(model_cfg),
                             "step": N,  (the training step; absent when not known)
                             "weights": {"bytes": N, "sha256": HEX}}  (model.safetensors as
                             written: checked before it is read)
    DIR/tokenizer.model     optional: the SentencePiece model the weights were trained with

The directory is written under a temporary name and renamed when complete. Weights keep the
dtype they have in memory; `load_consolidated` builds the module in fp32 on the CPU and casts.

`open_checkpoint` also takes the model out of the trainer's own checkpoints
(`RUN_DIR/checkpoints/step_N`, `pretrain/checkpoint.py`) of every engine, in one process on the
CPU with no process group: `kiln export` of an intermediate checkpoint for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pretrain.config import GROUP_SCHEMAS, ModelConfig

FORMAT_NAME = "kiln-consolidated"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


TRAINER_STATE = "trainer.json"  # what marks a training checkpoint (pretrain/checkpoint.py)


class CheckpointError(ValueError):
    """A path that is not a readable checkpoint; the message names the path."""


# A training checkpoint's record of its files (pretrain/checkpoint.py writes it, before its
# trainer.json): {"algorithm": "sha256", "files": {RELATIVE_PATH: {"bytes": N, "sha256": HEX}}},
# every file but trainer.json (the one a user may edit by hand) and this one.
CHECKSUMS = "checksums.json"


def file_sha256(path: Path, sync: bool = False) -> str:
    """The sha256 of the file at `path`, hex; with `sync`, its data also flushed to the disk
    (fsync: the page cache is the machine's, so any process there may flush what another
    wrote)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def recorded_files(path: Path, state: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The files the training checkpoint at `path` recorded when it was written (its
    checksums.json, itself recorded in its trainer.json, `state`: a deleted or emptied one is
    damage too), or None for one written before checkpoints recorded them."""
    record = Path(path) / CHECKSUMS
    expected = state.get("checksums")
    if not record.is_file():
        if isinstance(expected, dict):
            raise CheckpointError(
                f"{path}: {CHECKSUMS} is missing (its trainer.json records one of "
                f"{expected.get('files')} files): a damaged checkpoint or an incomplete copy"
            )
        return None
    try:
        text = record.read_bytes()
        if isinstance(expected, dict) and hashlib.sha256(text).hexdigest() != expected.get(
            "sha256"
        ):
            raise ValueError("it differs from the one its trainer.json records")
        files = json.loads(text)["files"]
        if not isinstance(files, dict):
            raise TypeError(f"files is a JSON {type(files).__name__}")
        for name, entry in files.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and isinstance(entry.get("sha256"), str)):  # fmt: skip
                raise TypeError(f"{name}'s entry is not {{bytes, sha256}}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{record}: unreadable ({error}): a damaged checkpoint") from error
    return files


def file_problems(path: Path, names: list[str], files: dict[str, dict[str, Any]]) -> list[str]:
    """How each of `names` (of `files`, as `recorded_files` gives them) in the checkpoint at
    `path` differs from what was written: missing, another size, other bytes."""
    problems = []
    for name in names:
        target, entry = Path(path) / name, files[name]
        if not target.is_file():
            problems.append(f"{name} is missing")
        elif target.stat().st_size != entry.get("bytes"):
            problems.append(f"{name} has {target.stat().st_size:,} bytes, {entry.get('bytes'):,} "
                            "were written")  # fmt: skip
        elif file_sha256(target) != entry.get("sha256"):
            problems.append(f"{name} does not match the checksum written with it")
    return problems


def damage(path: Path, problems: list[str]) -> str:
    """The message for a checkpoint whose files changed since they were written."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (
        f"{path}: {problems[0]}{more}: the checkpoint changed after it was written (a damaged "
        "disk or copy)"
    )


def verify_files(path: Path) -> None:
    """CheckpointError unless every file the training checkpoint at `path` recorded is as it
    was written, its RNG files aside (unread here): one process reads them all (`kiln export`,
    `trainer.init_from`; resuming ranks share the work)."""
    hint = "; take another checkpoint, or trainer.verify_checkpoints=false to read it as it is"
    try:
        state = json.loads((Path(path) / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{Path(path) / TRAINER_STATE}: unreadable ({error})") from error
    try:
        files = recorded_files(path, state if isinstance(state, dict) else {})
    except CheckpointError as error:
        raise CheckpointError(f"{error}{hint}") from None
    if files is None:
        return
    names = [name for name in sorted(files) if not name.startswith("rng_rank")]
    problems = file_problems(path, names, files)
    if problems:
        raise CheckpointError(damage(path, problems) + hint)


def consolidated_step(path: Path) -> int | None:
    """The training step recorded in the consolidated checkpoint at `path`, if any."""
    try:
        step = json.loads((Path(path) / CONFIG).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def save_consolidated(
    model: nn.Module,
    cfg: ModelConfig,
    path: Path,
    tokenizer_path: Path | None = None,
    step: int | None = None,
) -> Path:
    """Write `model` (built from `cfg`, trained `step` steps) as a consolidated checkpoint
    directory at `path`, replacing one that exists. Returns `path`."""
    from safetensors.torch import save_model

    from pretrain.atomic_dir import readable_as_umask_allows, staged

    path = Path(path)
    with staged(path) as staging:
        save_model(model, str(staging / WEIGHTS), metadata={"format": "pt"})
        readable_as_umask_allows(staging / WEIGHTS)
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": cfg.family,
            "model": asdict(cfg),
            "weights": {
                "bytes": (staging / WEIGHTS).stat().st_size,
                "sha256": file_sha256(staging / WEIGHTS, sync=True),
            },
        }
        if step is not None:
            config["step"] = step
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / TOKENIZER)
    return path


def model_config_from_dict(family: str, data: dict[str, Any]) -> ModelConfig:
    """Rebuild the family's config dataclass (nested `rope_scaling` and `moe` included) from
    `asdict` output. Keys missing from `data` take their defaults; an unknown key or a value
    of the wrong type raises CheckpointError naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = GROUP_SCHEMAS["model"].get(family)
    if schema is None:
        raise CheckpointError(f"unknown model family {family!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(getattr(error, "msg", None) or error).splitlines()[0]
        key = getattr(error, "full_key", None)
        raise CheckpointError(f"bad model config: {f'{key}: ' if key else ''}{message}") from error
    assert isinstance(cfg, schema)
    return cfg


def read_config(path: Path) -> ModelConfig:
    """The model config of the checkpoint at `path` (CheckpointError if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    config_file = path / CONFIG
    if not path.is_dir() or not config_file.is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(
            f"{path} is not a consolidated checkpoint (a directory with {CONFIG} and {WEIGHTS})"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file}: {error}") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_file} is not a {FORMAT_NAME} config")
    if config.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file} has format version {config.get('version')}, "
            f"this kiln reads {FORMAT_VERSION}"
        )
    try:
        return model_config_from_dict(config["family"], config["model"])
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{config_file}: missing or malformed {error}") from error
    except CheckpointError as error:
        raise CheckpointError(f"{config_file}: {error}") from error


def _verify_weights(path: Path) -> None:
    """CheckpointError unless the consolidated checkpoint's weights are as written (one
    written before config.json recorded them passes)."""
    try:
        written = json.loads((path / CONFIG).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return  # read_config has read it: nothing to add
    if not isinstance(written, dict):
        return
    weights = path / WEIGHTS
    size = weights.stat().st_size
    if size != written.get("bytes"):
        problem = f"{WEIGHTS} has {size:,} bytes, {written.get('bytes')} were written"
    elif file_sha256(weights) != written.get("sha256"):
        problem = f"{WEIGHTS} does not match the checksum written with it"
    else:
        return
    raise CheckpointError(
        f"{damage(path, [problem])}; take another checkpoint, or "
        "trainer.verify_checkpoints=false to read it as it is"
    )


def tokenizer_of(path: Path) -> Path | None:
    """The checkpoint's `tokenizer.model`, or None when it has none."""
    tokenizer = Path(path) / TOKENIZER
    return tokenizer if tokenizer.is_file() else None


def load_consolidated(path: Path, verify: bool = True) -> tuple[ModelConfig, nn.Module]:
    """The config and module of the checkpoint at `path`, in fp32 on the CPU, in eval mode.

    Weights load strictly: a missing or unexpected tensor raises CheckpointError, as do
    weights whose bytes are not those written (`verify`; safetensors has no checksum of its
    own, and a flipped bit loads as another weight)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from pretrain.models import empty_model

    cfg = read_config(path)
    if verify:
        _verify_weights(Path(path))
    model = empty_model(cfg, "cpu")  # every weight is loaded: nothing to initialise
    try:
        load_model(model, str(Path(path) / WEIGHTS), strict=True)
    except (RuntimeError, OSError, SafetensorError) as error:  # mismatches are RuntimeErrors
        raise CheckpointError(f"{Path(path) / WEIGHTS}: {error}") from error
    return cfg, model.eval()


@dataclass
class CheckpointSource:
    """Where a model's weights are: a consolidated checkpoint (`kind` "consolidated"), a
    training checkpoint of the engine that wrote it ("ddp", "fsdp" or "deepspeed"), or a
    transformers directory ("transformers", read whole when opened)."""

    path: Path
    kind: str
    config: ModelConfig
    tokenizer: Path | None  # the SentencePiece model it was trained with, when known
    step: int | None = None  # a training checkpoint's step
    module: nn.Module | None = None  # a transformers directory's weights, as our module
    # check a training checkpoint's files against its checksums.json before reading them
    # (`trainer.verify_checkpoints`)
    verify: bool = True

    def load_model(self) -> nn.Module:
        """The module, in fp32 on the CPU, in eval mode; weights load strictly (a missing or
        unexpected tensor, or another shape, raises CheckpointError)."""
        if self.kind == "consolidated":
            return load_consolidated(self.path, self.verify)[1]
        if self.module is not None:
            return self.module
        from pretrain.models import empty_model

        model = empty_model(self.config, "cpu")  # every weight is loaded
        state = self.read_state(model.state_dict())
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{self.path} ({self.kind} checkpoint): {error}") from error
        return model.eval()

    def read_state(self, template: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's state dict (our module's names), on the CPU. `template`, the model's
        own state dict, spares the FSDP reader building one."""
        if self.kind == "consolidated" or self.module is not None:
            return self.load_model().state_dict()
        import torch

        if self.verify:
            verify_files(self.path)  # flipped bytes would load as other weights, silently
        try:
            if self.kind == "ddp":
                from pretrain.engine.ddp import read_model_state

                return read_model_state(self.path)
            if self.kind == "fsdp":
                from pretrain.engine.fsdp import read_model_state
                from pretrain.models import empty_model

                if template is None:
                    template = empty_model(self.config, "cpu").state_dict()
                return read_model_state(self.path, template)
            accelerator = "cuda" if torch.cuda.is_available() else "cpu"
            os.environ.setdefault("DS_ACCELERATOR", accelerator)
            from pretrain.engine.deepspeed_engine import read_model_state

            return read_model_state(self.path)
        except (RuntimeError, OSError, KeyError, ValueError, EOFError) as error:
            raise CheckpointError(f"{self.path} ({self.kind} checkpoint): {error}") from error
        except BaseException as error:
            # torch.distributed.checkpoint's CheckpointException (a missing or cut shard of an
            # FSDP checkpoint) derives from BaseException, not Exception
            if type(error).__name__ != "CheckpointException":
                raise
            raise CheckpointError(f"{self.path} ({self.kind} checkpoint): "
                                  f"{_first_failure(error)}") from error  # fmt: skip


def _first_failure(error: BaseException) -> str:
    """One line for a CheckpointException: its first rank's error, which names the file."""
    for failure in (getattr(error, "failures", None) or {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        return f"{type(cause).__name__}: {cause}"
    return str(error).splitlines()[0]


def open_checkpoint(path: Path) -> CheckpointSource:
    """The checkpoint at `path`: a consolidated checkpoint directory, a training checkpoint
    (`RUN_DIR/checkpoints/step_N`, any engine; `RUN_DIR/checkpoints` or its `latest` pointer
    for the checkpoint it names), or a run directory (the newer of its `final/` and its latest
    checkpoint). Reads configs only; `load_model` reads the weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / CONFIG).is_file() and _is_transformers_config(path / CONFIG):
        from pretrain.models.hf import import_model

        try:
            config, module = import_model(path)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path} (a transformers directory): {error}") from error
        tokenizer = path / TOKENIZER  # what `kiln export` writes beside the weights
        return CheckpointSource(path, "transformers", config,
                                tokenizer if tokenizer.is_file() else None, module=module)  # fmt: skip
    if (path / CONFIG).is_file() or (path / WEIGHTS).is_file():
        return CheckpointSource(path, "consolidated", read_config(path), tokenizer_of(path))
    if (path / TRAINER_STATE).is_file():
        return _training_checkpoint(path)
    if path.name == "latest" and path.is_file():  # RUN_DIR/checkpoints/latest, the pointer
        return _training_checkpoint(_pointed_at(path))
    if (path / "latest").is_file():  # RUN_DIR/checkpoints
        return _training_checkpoint(_pointed_at(path / "latest"))
    final, pointer = path / "final", path / "checkpoints" / "latest"
    if (final / CONFIG).is_file() and pointer.is_file():
        # a run resumed or extended past its end trains on from its last checkpoint and
        # leaves the old final/ until it ends again: the newer of the two is the run's model
        latest = _training_checkpoint(_pointed_at(pointer))
        if _newer_than_final(latest, final):
            return latest
    if (final / CONFIG).is_file():
        source = open_checkpoint(final)
        source.step = consolidated_step(final)
        return source
    if pointer.is_file():
        return _training_checkpoint(_pointed_at(pointer))
    raise CheckpointError(
        f"{path} is not a checkpoint: give a consolidated checkpoint ({CONFIG} and {WEIGHTS}), "
        f"a training checkpoint (RUN_DIR/checkpoints/step_N, with {TRAINER_STATE}) or a run "
        "directory (its final/ or latest checkpoint)"
    )


def _pointed_at(pointer: Path) -> Path:
    """The checkpoint directory a `latest` pointer file names."""
    target = pointer.parent / pointer.read_text().strip()
    if not (target / TRAINER_STATE).is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is not a checkpoint")
    return target


def _newer_than_final(latest: CheckpointSource, final: Path) -> bool:
    """Whether the training checkpoint `latest` holds later weights than the consolidated
    `final` of the same run: by step, or (a final/ that records none) by modification time."""
    final_step = consolidated_step(final)
    if final_step is not None and latest.step is not None:
        return latest.step > final_step
    return (latest.path / TRAINER_STATE).stat().st_mtime > (final / CONFIG).stat().st_mtime


def _is_transformers_config(config_file: Path) -> bool:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and "format" not in config and "model_type" in config


def init_weights(model: nn.Module, cfg: ModelConfig, path: Path,
                 verify: bool = True) -> CheckpointSource:  # fmt: skip
    """`trainer.init_from`: copy the weights of the checkpoint at `path` (anything
    `open_checkpoint` takes) into `model`, the run's unwrapped module built from `cfg`;
    CheckpointError when their names or shapes are not the model's."""
    from pretrain.checkpoint import shape_differences
    from pretrain.preflight import config_differences

    source = open_checkpoint(path)
    source.verify = verify
    ours = model.state_dict()
    state = source.read_state({name: tensor.cpu() for name, tensor in ours.items()})
    parts = shape_differences({name: list(t.shape) for name, t in state.items()},
                              {name: list(t.shape) for name, t in ours.items()})  # fmt: skip
    if parts:
        keys = config_differences(asdict(source.config), asdict(cfg))
        if keys:
            parts.append(f"the model config differs in {', '.join(keys)}")
        raise CheckpointError(
            f"trainer.init_from={path} holds another model: {'; '.join(parts)}. Give the run "
            "the checkpoint's model (model=... and model.* overrides)"
        )
    model.load_state_dict(state, strict=True)
    return source


def _training_checkpoint(path: Path) -> CheckpointSource:
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:  # JSON and UTF-8 errors
        raise CheckpointError(f"{path / TRAINER_STATE}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path / TRAINER_STATE}: a JSON {type(state).__name__}, not a checkpoint's state"
        )
    if (path / "engine.pt").is_file():
        kind = "ddp"
    elif (path / "fsdp").is_dir():
        kind = "fsdp"
    elif (path / "deepspeed").is_dir():
        kind = "deepspeed"
    else:
        raise CheckpointError(f"{path}: a training checkpoint of no engine kiln knows")
    run_config = _run_config(path.parent.parent)  # RUN_DIR/checkpoints/step_N
    if "model" in state and "model_family" in state:
        config = model_config_from_dict(state["model_family"], state["model"])
    elif run_config is not None:
        config = run_config.model
    else:
        raise CheckpointError(
            f"{path}: its trainer.json names no model and {path.parent.parent}/config.pkl is "
            "missing (a checkpoint from before checkpoints recorded their model, moved out of "
            "its run directory)"
        )
    tokenizer = tokenizer_of(path)
    if tokenizer is None and run_config is not None:
        tokenizer = _run_tokenizer(run_config)
    return CheckpointSource(path, kind, config, tokenizer, state.get("step"))


def _run_config(run_dir: Path) -> Any:
    """The resolved config `kiln train` pickled into a run directory, or None."""
    import pickle

    config = run_dir / "config.pkl"
    if not config.is_file():
        return None
    try:
        return pickle.loads(config.read_bytes())  # noqa: S301 - written by `kiln train`
    except Exception:  # an unreadable one only costs the fallback  # noqa: BLE001
        return None


def _run_tokenizer(cfg: Any) -> Path | None:
    """The tokenizer of a run's local shards, when they are still where the run read them."""
    from data_pipeline.shards import ShardFormatError, read_manifest
    from pretrain.data import remote

    if remote.is_remote(cfg.data.path):
        return None
    directory = remote.local_path(cfg.data.path)
    try:
        tokenizer = directory / read_manifest(directory).tokenizer.path
    except ShardFormatError:
        return None
    return tokenizer if tokenizer.is_file() else None
