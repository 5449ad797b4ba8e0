"""pretrain/atomic_dir.py: a directory replaced whole, and what a writer killed part way left
(its staging directory, or the previous directory moved aside) dealt with by the next writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.atomic_dir import recover, staged


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (as a killed writer's has)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_staged_directory_replaces_the_target_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with staged(target) as staging:
        (staging / "a").write_text("1")
    with staged(target) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with pytest.raises(RuntimeError), staged(target) as staging:
        (staging / "c").write_text("3")
        raise RuntimeError("the writer failed")
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_killed_replacement_is_undone_and_its_leftovers_removed(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # killed between the two renames: the previous directory aside, none in its place
    target = tmp_path / "export"
    old = tmp_path / f".export.old-{dead_pid}-0a1b2c3d"
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    staging = tmp_path / f".export.tmp-{dead_pid}-4e5f6a7b"
    staging.mkdir()
    (staging / "model.safetensors").write_text("half")
    live = tmp_path / f".export.tmp-{os.getpid()}-8c9d0e1f"  # a writer still at work
    live.mkdir()
    assert recover(target) == [
        f"restored {target} from {old.name} (a replacement cut short)",
        f"removed {staging} (left by a writer that was stopped)",
    ]
    assert (target / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]
    # a previous directory aside while a newer one is in place: removed; said on stderr
    old.mkdir()
    with staged(target) as fresh:
        (fresh / "model.safetensors").write_text("new")
    assert f"kiln: removed {old}" in capsys.readouterr().err
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]
