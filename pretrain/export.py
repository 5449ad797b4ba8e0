"""`kiln export`: a consolidated checkpoint to a Hugging Face transformers directory.

    kiln export export.checkpoint=CKPT export.output_dir=OUT [export.dtype=bfloat16]
                [export.tokenizer=PATH.model] [overwrite=true]

CKPT is a consolidated checkpoint (`pretrain/checkpoint_io.py`), a training checkpoint of any
engine (`RUN_DIR/checkpoints/step_N`: an intermediate one, for evaluation), or a run directory
(its `final/`, else its latest checkpoint). OUT receives config.json,
generation_config.json and model.safetensors for the checkpoint's transformers class
(`pretrain/models/hf`), plus the tokenizer when the checkpoint carries `tokenizer.model` (or
`export.tokenizer` names one). OUT is written under a temporary name and renamed when
complete. Problems the user can fix (no checkpoint, a model with no transformers equivalent,
an existing OUT) print one line and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.config import KilnConfig

ERROR_EXIT_CODE = 1


def fail(message: str) -> int:
    print(f"kiln export: {message}", file=sys.stderr)
    return ERROR_EXIT_CODE


def run(cfg: KilnConfig) -> int:
    settings = cfg.export
    # what a user can fix without a checkpoint being read is said before torch and
    # transformers are imported (about 3 s of the command's start)
    if settings.checkpoint is None:
        return fail(
            "export.checkpoint is required: pass export.checkpoint=PATH, a consolidated "
            "checkpoint (RUN_DIR/final), a training checkpoint (RUN_DIR/checkpoints/step_N) or a "
            "run directory"
        )
    checkpoint = Path(settings.checkpoint)
    if not checkpoint.exists():
        return fail(f"export.checkpoint: {checkpoint} does not exist")
    out_dir = Path(settings.output_dir)
    from pretrain.atomic_dir import say_recovered

    say_recovered(out_dir)  # an export cut short: its previous directory back in place first
    if out_dir.exists() and not cfg.overwrite and any(out_dir.iterdir()):
        return fail(f"{out_dir} exists and is not empty (overwrite=true replaces it)")

    import torch
    from transformers.utils import logging as hf_logging

    from pretrain.checkpoint_io import CheckpointError, open_checkpoint
    from pretrain.models.hf import export_model, hf_module_for

    hf_logging.disable_progress_bar()
    try:
        source = open_checkpoint(checkpoint)
        model_cfg = source.config
        module = hf_module_for(model_cfg)
        module.hf_config(model_cfg)  # no transformers equivalent: say so before loading weights
        model = source.load_model()
    except CheckpointError as error:
        return fail(f"export.checkpoint: {error}")
    except ValueError as error:
        return fail(str(error))
    if source.kind != "consolidated" or source.path != checkpoint:
        step = f" at step {source.step}" if source.step is not None else ""
        print(f"kiln export: reading the {source.kind} checkpoint {source.path}{step}")
    tokenizer = source.tokenizer
    if tokenizer is None and settings.tokenizer is not None:
        tokenizer = Path(settings.tokenizer)
        if not tokenizer.is_file():
            return fail(f"export.tokenizer: {tokenizer} does not exist")
    try:
        export_model(model, model_cfg, out_dir, tokenizer_path=tokenizer,
                     dtype=getattr(torch, settings.dtype), overwrite=cfg.overwrite)  # fmt: skip
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        return fail(str(error))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"kiln export: wrote {module.HF_CLASS} ({model_cfg.name}, {params:,} parameters, "
        f"{settings.dtype}) to {out_dir}"
    )
    print(
        f"kiln export: tokenizer from {tokenizer}"
        if tokenizer is not None
        else "kiln export: no tokenizer (the checkpoint has none; set export.tokenizer=PATH)"
    )
    return 0
