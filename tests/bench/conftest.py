"""Shared by the bench smoke tests: the smoke corpus (the stdlib's json package, a 1000-piece
tokenizer) built once by `kiln data`, through the benches' own `build_data`, for the smoke
runs that take `--data` (bench/gpu.py's smoke builds its own: that is one of its stages)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(REPO))
    from bench.trainer import build_data

    out = tmp_path_factory.mktemp("smoke_data") / "data"
    build_data(out, smoke=True)
    assert (out / "manifest.json").is_file()
    return out
