"""pretrain/run_lock.py: one training run at a time in a run directory, the holder named."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pretrain.run_lock import RunDirBusy, busy, hold


def test_a_held_run_directory_is_refused_naming_its_holder(tmp_path: Path) -> None:
    assert busy(tmp_path / "none yet") is None and busy(tmp_path) is None  # free
    with hold(tmp_path):
        message = busy(tmp_path)
        assert message is not None
        assert message.startswith(f"trainer.run_dir={tmp_path} is in use by another training "
                                  f"run (pid {os.getpid()} on {socket.gethostname()}, since ")  # fmt: skip
        assert message.endswith("stop it first, or train in another trainer.run_dir")
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"), hold(tmp_path, 0.0):
            pass
    assert busy(tmp_path) is None  # let go at the end of the block
    with pytest.raises(ZeroDivisionError), hold(tmp_path):
        raise ZeroDivisionError  # and when the run fails
    assert busy(tmp_path) is None
