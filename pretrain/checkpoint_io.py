"""The consolidated checkpoint: one model's full weights and config in a plain directory.

The trainer writes one when a run ends (and on request); `kiln export` reads it. Unlike the
trainer's sharded, resumable checkpoints it holds no optimizer state and no sharding, so any
process can load it on one CPU. Layout:

    DIR/model.safetensors   our module's state dict (`safetensors.torch.save_model`: a tensor
                            shared by two names, such as tied embeddings, is stored once)
    DIR/config.json         {"format": "kiln-consolidated", "version": 1,
                             "family": "decoder" | "encoder" | "encoder_decoder",
                             "model": dataclasses.asdict(model_cfg)}
    DIR/tokenizer.model     optional: the SentencePiece model the weights were trained with

The directory is written under a temporary name and renamed when complete. Weights keep the
dtype they have in memory; `load_consolidated` builds the module in fp32 on the CPU and casts.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from pretrain.config import GROUP_SCHEMAS, ModelConfig

FORMAT_NAME = "kiln-consolidated"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"


class CheckpointError(ValueError):
    """A path that is not a readable consolidated checkpoint; the message names the path."""


def save_consolidated(
    model: nn.Module, cfg: ModelConfig, path: Path, tokenizer_path: Path | None = None
) -> Path:
    """Write `model` (built from `cfg`) as a consolidated checkpoint directory at `path`,
    replacing one that exists. Returns `path`."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_model(model, str(staging / WEIGHTS), metadata={"format": "pt"})
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "family": cfg.family,
            "model": asdict(cfg),
        }
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / TOKENIZER)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        staging.rename(path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
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


def tokenizer_of(path: Path) -> Path | None:
    """The checkpoint's `tokenizer.model`, or None when it has none."""
    tokenizer = Path(path) / TOKENIZER
    return tokenizer if tokenizer.is_file() else None


def load_consolidated(path: Path) -> tuple[ModelConfig, nn.Module]:
    """The config and module of the checkpoint at `path`, in fp32 on the CPU, in eval mode.

    Weights load strictly: a missing or unexpected tensor raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from pretrain.models import build_model

    cfg = read_config(path)
    model = build_model(cfg)
    try:
        load_model(model, str(Path(path) / WEIGHTS), strict=True)
    except (RuntimeError, OSError, SafetensorError) as error:  # mismatches are RuntimeErrors
        raise CheckpointError(f"{Path(path) / WEIGHTS}: {error}") from error
    return cfg, model.eval()
