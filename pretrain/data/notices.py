"""Data warnings said once per run, on rank 0.

Each evaluation builds its loader anew, and every rank builds its own: a shard skipped or a
server gone would otherwise be reported by every rank at every evaluation. A run is one
process per rank, so "once per run" is once per process; rank 0 speaks for all of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

_said: set[str] = set()


def is_rank_zero() -> bool:
    """Whether this process is the run's rank 0 (torch.distributed's rank once initialised,
    before that the RANK torchrun sets; a process without either is rank 0)."""
    distributed = sys.modules.get("torch.distributed")  # not imported: not initialised
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def first_time(keys: Iterable[str]) -> list[str]:
    """The keys not seen before in this process, in order; all of them are seen from now on.
    Every rank records them, so a rank 0 that says them and one that does not agree."""
    new = [key for key in dict.fromkeys(keys) if key not in _said]
    _said.update(new)
    return new


def forget() -> None:
    """Start over as if nothing had been said (for tests: one process runs many)."""
    _said.clear()
