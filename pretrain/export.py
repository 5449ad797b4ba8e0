"""`kiln export`: a consolidated checkpoint to a Hugging Face transformers directory.

    kiln export export.checkpoint=CKPT export.output_dir=OUT [export.dtype=bfloat16]
                [export.tokenizer=PATH.model] [overwrite=true]
    kiln export experiment=NAME [overrides] [export.output_dir=OUT]

CKPT is a consolidated checkpoint (`pretrain/checkpoint_io.py`), a training checkpoint of any
engine (`RUN_DIR/checkpoints/step_N`: an intermediate one, for evaluation; `RUN_DIR/checkpoints`
or its `latest` file for the one it names), or a run directory (the newer of its `final/` and
its latest checkpoint); without export.checkpoint, the composed run directory
(`trainer.run_dir`), as `kiln train` with the same experiment and overrides wrote it. OUT
receives config.json, generation_config.json and model.safetensors for the checkpoint's
transformers class (`pretrain/models/hf`), plus the tokenizer: `export.tokenizer` when given, else the
checkpoint's `tokenizer.model`. OUT is written under a temporary name and renamed when
complete; it is never the checkpoint's own directory (or a parent of it), nor a run, data or
checkpoint directory of kiln's. Problems the user can fix (no checkpoint, a model with no
transformers equivalent, an existing OUT) print one line and exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.config import KilnConfig

ERROR_EXIT_CODE = 1


def fail(message: str) -> int:
    print(f"kiln export: {message}", file=sys.stderr)
    return ERROR_EXIT_CODE


# what marks a directory kiln wrote and must not be replaced by an export: a run directory,
# a data build, a training or consolidated checkpoint
KILN_MARKS = ("metrics.jsonl", "checkpoints", "config.pkl", "manifest.json", "trainer.json")


def output_problem(checkpoint: Path, out_dir: Path) -> str | None:
    """Why `out_dir` must not receive the export of `checkpoint`, or None. overwrite=true
    replaces the output directory whole, so it must not hold the checkpoint being read (the
    run directory given as both, or a parent of it) nor be a directory of kiln's own."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"export.output_dir={out_dir} is a file, not a directory"
    source, target = checkpoint.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        return (f"export.output_dir={out_dir} holds the checkpoint being exported "
                f"({checkpoint}); export to another directory")  # fmt: skip
    if not out_dir.is_dir():
        return None
    marks = [name for name in KILN_MARKS if (out_dir / name).exists()]
    if is_consolidated(out_dir):
        marks.append("config.json of a kiln checkpoint")
    if marks:
        return (f"export.output_dir={out_dir} is a kiln run, data or checkpoint directory (it "
                f"has {', '.join(marks)}), which an export does not replace; export to another "
                "directory")  # fmt: skip
    return None


def is_consolidated(directory: Path) -> bool:
    import json

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == "kiln-consolidated"


def missing_checkpoint(path: Path) -> str:
    """What to say of a checkpoint path that does not exist: a training checkpoint pruned by
    `trainer.keep_checkpoints` (or mistyped) comes with the ones its directory holds."""
    if not (path.name.startswith("step_") and path.parent.is_dir()):
        return f"{path} does not exist"
    held = sorted(p.name for p in path.parent.glob("step_*") if p.is_dir())
    return f"{path} does not exist; {path.parent} holds {', '.join(held) or 'no checkpoint'}"


def run(cfg: KilnConfig) -> int:
    settings = cfg.export
    # what a user can fix without a checkpoint being read is said before torch and
    # transformers are imported (about 3 s of the command's start)
    if settings.checkpoint is None and not Path(cfg.trainer.run_dir).is_dir():
        return fail(
            f"nothing to export: no run at trainer.run_dir={cfg.trainer.run_dir}; pass the "
            "experiment and overrides the run trained with, or export.checkpoint=PATH: a "
            "consolidated checkpoint (RUN_DIR/final), a training checkpoint "
            "(RUN_DIR/checkpoints/step_N) or a run directory"
        )
    # the composed run, as `kiln train` wrote it: the newer of its final/ and latest checkpoint
    checkpoint = Path(settings.checkpoint or cfg.trainer.run_dir)
    if not checkpoint.exists():
        return fail(f"export.checkpoint: {missing_checkpoint(checkpoint)}")
    out_dir = Path(settings.output_dir)
    problem = output_problem(checkpoint, out_dir)
    if problem is not None:
        return fail(problem)
    tokenizer = None if settings.tokenizer is None else Path(settings.tokenizer)
    if tokenizer is not None and not tokenizer.is_file():
        return fail(f"export.tokenizer: {tokenizer} does not exist")
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
        source.verify = cfg.trainer.verify_checkpoints
        model_cfg = source.config
        module = hf_module_for(model_cfg)
        module.hf_config(model_cfg)  # no transformers equivalent: say so before loading weights
        model = source.load_model()
    except CheckpointError as error:
        return fail(f"export.checkpoint: {error}")
    except ValueError as error:
        return fail(str(error))
    step = f" at step {source.step}" if source.step is not None else ""
    print(f"kiln export: reading the {source.kind} checkpoint {source.path}{step}")
    if tokenizer is None:  # an explicit export.tokenizer wins over the checkpoint's own
        tokenizer = source.tokenizer
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
