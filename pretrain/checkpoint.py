"""Training checkpoints: atomic directories, a `latest` pointer, the last k kept.

    RUN_DIR/checkpoints/step_00000200/    engine state (model, optimizer, scheduler: the
                                          engine's own format), rng_rank{R}.pt per rank,
                                          trainer.json (step, tokens, loader state, W&B id...)
    RUN_DIR/checkpoints/latest            the name of the newest complete checkpoint

A checkpoint is written under `.step_N.tmp`, renamed when every rank has written its part,
and only then does `latest` (itself written through a temporary file and a rename) move to
it: a crash at any moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import atomic_write_bytes

TRAINER_STATE = "trainer.json"


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds the checkpoints of one run directory (every rank builds one)."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank, self.world = rank_and_world()

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / TRAINER_STATE).is_file() else None

    def save(self, engine: Any, trainer_state: dict[str, Any], step: int) -> Path:
        """Write a checkpoint of `engine` and `trainer_state` at `step` (collective)."""
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        barrier()
        if os.environ.get("KILN_FAULT_CRASH_IN_SAVE") == str(step):  # tests: die mid-save
            os._exit(17)
        if self.rank == 0:
            state = trainer_state | {"step": step, "world_size": self.world}
            atomic_write_bytes(tmp / TRAINER_STATE, json.dumps(state, indent=1).encode())
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            atomic_write_bytes(self.root / "latest", name.encode())
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if (p / TRAINER_STATE).is_file())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> dict[str, Any]:
        """Restore `engine` and this rank's RNG from `path`; returns the trainer state."""
        state = json.loads((Path(path) / TRAINER_STATE).read_text())
        engine.load(Path(path))
        rng = Path(path) / f"rng_rank{self.rank}.pt"
        if rng.is_file() and state.get("world_size") == self.world:
            set_rng_state(torch.load(rng, weights_only=False))
        barrier()
        return state
