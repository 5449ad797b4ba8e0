"""The global sample order: which source sample is global sample `i`, for any `i`, in O(1).

Global samples are numbered 0, 1, 2, ... across the whole run; a step consumes the next
`global_batch_size` of them, whatever the number of ranks, so a run resumed at another world
size continues at the same global cursor with nothing repeated and nothing skipped.

The order is made of *windows* of `shuffle_buffer` consecutive global indices. In window `w`
each source gets a number of slots fixed by the mixture weights (largest-remainder rounding
of the cumulative target, so after any number of windows every source is within one sample of
its weighted share), and the slots are shuffled with a permutation seeded by (seed, segment,
w): a bounded shuffle that needs no buffer and no history, so any worker can compute any
sample. Source `s`'s k-th slot overall is its k-th sample, so each source is read in order,
exactly once per epoch of its stream.

A *segment* starts when the weights change on resume: from that global index on, slots are
allocated with the new weights, on top of the samples each source had already given
(`base`), so no source re-reads what it gave before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segment:
    """A stretch of global indices with one set of weights."""

    start: int  # first global index of the segment
    weights: dict[str, float]  # source -> weight (normalised on use)
    base: dict[str, int] = field(default_factory=dict)  # samples per source before `start`
    number: int = 0  # 0, 1, 2, ...: part of the permutation seed

    def to_dict(self) -> dict[str, object]:
        return {"start": self.start, "weights": dict(self.weights), "base": dict(self.base),
                "number": self.number}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Segment:
        return cls(
            start=int(data["start"]),  # type: ignore[arg-type]
            weights={k: float(v) for k, v in dict(data["weights"]).items()},  # type: ignore[arg-type]
            base={k: int(v) for k, v in dict(data["base"]).items()},  # type: ignore[arg-type]
            number=int(data["number"]),  # type: ignore[arg-type]
        )


def cumulative_allocation(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, as close as possible to `total * weights`."""
    target = total * weights
    counts = np.floor(target).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        remainders = target - counts
        # ties broken by source position, so the result is deterministic
        order = np.lexsort((np.arange(len(weights)), -remainders))
        counts[order[:short]] += 1
    return counts


class GlobalOrder:
    """Maps global sample indices to (source, index of the sample within that source)."""

    def __init__(self, sources: Sequence[str], segment: Segment, window: int, seed: int) -> None:
        self.sources = list(sources)
        missing = [s for s in self.sources if segment.weights.get(s, 0.0) <= 0.0]
        if missing:
            raise ValueError(f"no positive mixture weight for source(s) {missing}")
        weights = np.array([segment.weights[s] for s in self.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        if (self.weights * window < 1).any():
            small = [s for s, w in zip(self.sources, self.weights, strict=True) if w * window < 1]
            raise ValueError(
                f"data.shuffle_buffer={window} gives source(s) {small} less than one sample per "
                "window; raise data.shuffle_buffer or their weight"
            )
        self.segment = segment
        self.window = window
        self.seed = seed
        self.base = np.array([segment.base.get(s, 0) for s in self.sources], dtype=np.int64)
        self._windows: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot -> source position, slot -> rank of the slot within its source, counts
        before window w) for window w of the segment."""
        cached = self._windows.get(w)
        if cached is not None:
            return cached
        before = cumulative_allocation(w * self.window, self.weights)
        after = cumulative_allocation((w + 1) * self.window, self.weights)
        counts = after - before
        owner = np.repeat(np.arange(len(self.sources)), counts)  # unshuffled slots by source
        rank = np.concatenate([np.arange(n) for n in counts])
        rng = np.random.default_rng([self.seed, self.segment.number, w])
        permutation = rng.permutation(self.window)
        result = (owner[permutation], rank[permutation], before)
        self._windows[w] = result
        while len(self._windows) > 16:
            self._windows.popitem(last=False)
        return result

    def lookup(self, index: int) -> tuple[int, int]:
        """(source position, sample index within the source) of global sample `index`."""
        offset = index - self.segment.start
        if offset < 0:
            raise ValueError(
                f"global index {index} precedes the segment start {self.segment.start}"
            )
        w, slot = divmod(offset, self.window)
        owner, rank, before = self._window(w)
        source = int(owner[slot])
        return source, int(self.base[source] + before[source] + rank[slot])

    def consumed(self, index: int) -> dict[str, int]:
        """Samples each source has given for global indices below `index` (the data ledger)."""
        offset = max(0, index - self.segment.start)
        w, slot = divmod(offset, self.window)
        owner, _, before = self._window(w)
        counts = self.base + before + np.bincount(owner[:slot], minlength=len(self.sources))
        return {name: int(n) for name, n in zip(self.sources, counts, strict=True)}


def rank_indices(
    step: int, micro: int, *, global_batch: int, micro_batch: int, rank: int, world: int
) -> range:
    """Global sample indices of micro-batch `micro` of `step` on data-parallel `rank`.

    A step takes global indices [step * G, (step + 1) * G); micro-batch a of every rank comes
    from [step * G + a * m * W, ...), rank r taking m consecutive indices of it. Every rank
    gets exactly G / (m * W) micro-batches of m samples per step.
    """
    start = step * global_batch + micro * micro_batch * world + rank * micro_batch
    return range(start, start + micro_batch)
