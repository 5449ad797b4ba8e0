"""pretrain/checkpoint.py at one rank: background saves (`trainer.async_checkpoint`) write the
state of their step however it changes afterwards, and a failed one is raised at the next save
with `latest` left on the previous checkpoint. (The 2-rank DDP and FSDP runs are in
test_engines.py, the crash mid-save in test_trainer_faults.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointManager, host_copy, write_files


class TensorEngine:
    """The two save methods of an engine, over one tensor (the real engines: test_engines.py).
    `gate` holds the background writer until the test releases it."""

    def __init__(self) -> None:
        self.weight = torch.zeros(4)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def save(self, directory: Path) -> None:
        torch.save({"weight": self.weight}, directory / "engine.pt")

    def save_async(self, directory: Path, group: object):  # noqa: ANN201
        files = host_copy({directory / "engine.pt": {"weight": self.weight}})

        def write() -> None:
            self.gate.wait()
            if self.fail:
                raise OSError(28, "No space left on device")
            write_files(files)

        return write


def saved_weight(path: Path) -> torch.Tensor:
    return torch.load(path / "engine.pt", weights_only=True)["weight"]


def test_host_copy_shares_nothing_and_keeps_the_structure() -> None:
    state = {"model": {"w": torch.ones(3)}, "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}],
             "step": torch.tensor(5), "name": "adamw"}  # fmt: skip
    copied = host_copy(state)
    state["model"]["w"].add_(1)
    state["step"].add_(1)
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copied["model"]["w"], torch.ones(3)) and int(copied["step"]) == 5
    assert copied["groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}]
    assert isinstance(copied["groups"][0]["betas"], tuple) and copied["name"] == "adamw"


def test_a_background_save_holds_the_state_of_its_step(tmp_path: Path) -> None:
    engine = TensorEngine()
    checkpoints = CheckpointManager(tmp_path, keep=2)
    engine.gate.clear()  # the writer waits: the save must not depend on it
    path = checkpoints.save(engine, {"tokens": 10}, step=1, background=True)
    assert path.name == "step_00000001" and not path.exists() and checkpoints.latest() is None
    engine.weight.add_(5)  # training goes on
    engine.gate.set()
    checkpoints.wait()
    assert checkpoints.latest() == path
    assert torch.equal(saved_weight(path), torch.zeros(4))
    assert json.loads((path / "trainer.json").read_text()) == {"tokens": 10, "step": 1,
                                                               "world_size": 1}  # fmt: skip
    # the next save waits for the one in flight; keep=2 prunes the oldest
    for step in (2, 3):
        engine.weight.add_(1)
        checkpoints.save(engine, {"tokens": 10 * step}, step=step, background=True)
    checkpoints.save(engine, {"tokens": 40}, step=4)  # foreground
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_00000003", "step_00000004"]  # fmt: skip
    assert torch.equal(saved_weight(tmp_path / "checkpoints" / "step_00000003"),
                       torch.full((4,), 7.0))  # fmt: skip


def test_a_failed_background_save_is_raised_and_latest_stays(tmp_path: Path) -> None:
    engine = TensorEngine()
    checkpoints = CheckpointManager(tmp_path, keep=3)
    checkpoints.save(engine, {}, step=1)
    engine.fail = True
    checkpoints.save(engine, {}, step=2, background=True)
    with pytest.raises(RuntimeError, match=r"background checkpoint .*step_00000002 failed on "
                       r"rank 0: OSError: .*No space left on device.*previous one"):  # fmt: skip
        checkpoints.save(engine, {}, step=3, background=True)
    assert checkpoints.latest() == tmp_path / "checkpoints" / "step_00000001"
    assert not (tmp_path / "checkpoints" / ".step_00000002.tmp" / "trainer.json").exists()
    checkpoints.wait()  # raised once: nothing in flight, nothing left to raise
    engine.fail = False
    checkpoints.save(engine, {}, step=3, background=True)
    checkpoints.wait()
    assert checkpoints.latest() == tmp_path / "checkpoints" / "step_00000003"
