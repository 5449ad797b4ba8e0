"""The run's side of the shard contract, without torch: read the manifest `kiln data` wrote and
check it against the run's config (the tokenizer fits the model, the mixture names sources the
shards have).

The loader calls it on every rank; `kiln train` calls it once before it starts any rank (see
`pretrain/preflight.py`), so a wrong `data.path` costs one line, not a traceback per rank after
torch and the process group came up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_pipeline.shards import (
    MANIFEST_NAME,
    Manifest,
    NoManifestError,
    ShardFormatError,
    find_output_dir,
    read_manifest,
    sha256_file,
)


class DataError(ValueError):
    """Data that cannot feed this run: the message names the shard, source or key."""


def data_command(cfg: Any, out_dir: Path, *extra: str) -> str:
    """The `kiln data` command that writes `out_dir` for this run: with the run's experiment
    (which sets the corpus and tokenizer), and `output_dir` when the experiment's differs."""
    experiment = getattr(cfg, "experiment_name", None)
    args = [f"experiment={experiment}"] if experiment else []
    if not experiment or Path(getattr(cfg, "output_dir", "")) != out_dir:
        args.append(f"output_dir={out_dir}")
    return " ".join(["kiln data", *args, *extra])


def open_manifest(cfg: Any, out_dir: Path) -> Manifest:
    """`out_dir`'s manifest, checked against `cfg.model.vocab_size` and `cfg.data.mixture`;
    DataError names what does not fit."""
    try:
        manifest = read_manifest(out_dir)
    except NoManifestError as error:
        above = find_output_dir(out_dir)
        if above is not None:  # data.path names a file or directory inside the output
            raise DataError(
                f"data.path={out_dir}: data.path is the kiln data output directory (the one "
                f"holding {MANIFEST_NAME}): use data.path={above}"
            ) from error
        raise DataError(f"{out_dir / MANIFEST_NAME}: no manifest (run "
                        f"`{data_command(cfg, out_dir)}` first)") from error  # fmt: skip
    except ShardFormatError as error:
        raise DataError(str(error)) from error
    tokenizer = manifest.tokenizer
    # a tokenizer changed since the build would fail only at the end of the run (its sample)
    # and be copied into every checkpoint; one that is missing is left out of them (tests
    # write shards without one)
    path = out_dir / tokenizer.path
    if path.is_file() and sha256_file(path) != tokenizer.sha256:
        raise DataError(
            f"{path}: sha256 differs from the manifest (the tokenizer changed since the "
            f"shards were built); restore it, or rebuild with "
            f"`{data_command(cfg, out_dir, 'overwrite=true')}`"
        )
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise DataError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer of "
            f"{out_dir} ({tokenizer.vocab_size} pieces); set model.vocab_size >= "
            f"{tokenizer.vocab_size}"
        )
    unknown = sorted(set(cfg.data.mixture) - set(manifest.weights))
    if unknown:
        raise DataError(
            f"data.mixture names unknown source(s) {unknown}; {out_dir} has "
            f"{sorted(manifest.weights)}"
        )
    return manifest
