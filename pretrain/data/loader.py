"""The trainer's data loader: shards -> packed, transformed micro-batches for one rank.

`build_loader` reads the manifest `kiln data` wrote, checks the tokenizer against the model,
checks the shards (`data.verify`, `data.on_bad_shard`), and returns a torch `DataLoader` over a
`ShardDataset` plus the `LoaderState` the trainer saves in its checkpoints.

Where a micro-batch comes from is a pure function of the global sample cursor (see `order.py`):
micro-batch `a` of step `k` on rank `r` holds global samples
`cursor + k * G + a * m * W + r * m + [0, m)` (each batch carries them as `index`). Each
DataLoader worker computes its own share
of micro-batches (worker `w` of `n` takes every n-th), and torch's DataLoader returns them in
order, so ranks and workers never overlap, every rank gets the same number of micro-batches per
step, and nothing but the cursor (plus the mixture history) needs saving. A sample's random
choices (masks, spans) are seeded by its global index, so they do not depend on the world size
either.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import Manifest, ShardFormatError, ShardRecord, sha256_file
from pretrain.data.manifest import DataError, open_manifest
from pretrain.data.notices import first_time, is_rank_zero
from pretrain.data.order import GlobalOrder, Segment
from pretrain.data.shard_reader import ShardIndex, SourceStream
from pretrain.noising import ids_after_ends

log = logging.getLogger("kiln.data")
SAMPLE_SEED_SALT = 7919  # keeps sample RNG streams apart from the order's
TRANSFER_BLOCK = 8  # micro-batches a DataLoader worker builds and sends at a time


class Objective(Protocol):
    """What the loader needs of an objective transform (see `pretrain/objectives.py`)."""

    def raw_length(self, seq_len: int) -> int: ...

    def __call__(
        self, tokens: np.ndarray, document_ids: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]: ...


@dataclass
class LoaderState:
    """Everything needed to continue the sample stream, saved in every checkpoint."""

    samples: int = 0  # global samples consumed so far (the cursor)
    steps: int = 0  # optimizer steps taken so far (drives sequence-length warmup)
    segments: list[Segment] = field(default_factory=list)  # mixture history, current last
    tokenizer_sha256: str = ""
    seq_len: int = 0
    # the order's shuffle window and seed (data.shuffle_buffer, data.seed) of the current
    # segment; 0 / None in a state saved before they were recorded (the config's then)
    window: int = 0
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "steps": self.steps,
            "segments": [segment.to_dict() for segment in self.segments],
            "tokenizer_sha256": self.tokenizer_sha256,
            "seq_len": self.seq_len,
            "window": self.window,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoaderState:
        seed = data.get("seed")
        return cls(
            samples=int(data["samples"]),
            steps=int(data.get("steps", 0)),
            segments=[Segment.from_dict(s) for s in data["segments"]],
            tokenizer_sha256=str(data["tokenizer_sha256"]),
            seq_len=int(data["seq_len"]),
            window=int(data.get("window", 0)),
            seed=None if seed is None else int(seed),
        )


@dataclass(frozen=True)
class Batching:
    global_batch: int
    micro_batch: int
    rank: int
    world: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)


class ShardDataset(IterableDataset):
    """Micro-batches (dicts of tensors) for one rank, starting at a global cursor."""

    def __init__(
        self,
        out_dir: Path,
        shards: dict[str, list[ShardRecord]],
        objective: Objective,
        *,
        seq_len: int,
        stride: int,
        batching: Batching,
        segment: Segment,
        cursor: int,
        num_steps: int | None,
        start_step: int = 0,
        warmup: tuple[int, int] = (0, 0),
        window: int,
        seed: int,
        eos: int,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.shards = shards
        self.sources = list(shards)
        self.objective = objective
        self.raw_length = objective.raw_length(seq_len)
        self.stride = stride
        self.batching = batching
        self.segment = segment
        self.cursor = cursor
        self.num_steps = num_steps
        self.start_step = start_step
        self.warmup_steps, self.warmup_start = warmup
        self.seq_len = seq_len
        self.window = window
        self.seed = seed
        self.eos = eos
        self.vocab_size = vocab_size  # the tokenizer's: a larger id is a damaged shard
        self.random = getattr(objective, "uses_rng", True)
        self._streams: list[SourceStream] | None = None  # per worker process, built lazily
        self._order: GlobalOrder | None = None

    def order(self) -> GlobalOrder:
        if self._order is None:
            self._order = GlobalOrder(self.sources, self.segment, self.window, self.seed)
        return self._order

    def streams(self) -> list[SourceStream]:
        if self._streams is None:
            self._streams = [
                SourceStream(
                    self.out_dir,
                    name,
                    self.shards[name],
                    self.eos,
                    self.seed,
                    vocab_size=self.vocab_size,
                )  # fmt: skip
                for name in self.sources
            ]
        return self._streams

    def seq_len_at(self, step: int) -> int:
        """Sequence-length warmup: the longest of seq_len, seq_len/2, seq_len/4, ... (but not
        below `seq_len_warmup_start`) that does not exceed the linear ramp from
        `seq_len_warmup_start` to `seq_len` over `seq_len_warmup_steps`."""
        if step >= self.warmup_steps:
            return self.seq_len
        ramp = self.warmup_start + (self.seq_len - self.warmup_start) * step / self.warmup_steps
        length = self.seq_len
        while length > ramp and length // 2 >= self.warmup_start and length % 2 == 0:
            length //= 2
        return length

    def micro_batch(self, indices: range, step: int | None = None) -> dict[str, torch.Tensor]:
        """Global samples `indices`, transformed by the objective and stacked.

        During sequence-length warmup (causal objectives) each sample of seq_len + 1 tokens is
        cut into seq_len / L rows of L + 1 tokens (each row's last token is the next row's
        first input), so a step holds the same tokens in more, shorter rows.
        """
        order, streams = self.order(), self.streams()
        tokens = np.empty((len(indices), self.raw_length), dtype=np.int64)
        for row, index in enumerate(indices):
            source, position = order.lookup(index)
            tokens[row] = streams[source].read(position * self.stride, self.raw_length)
        # a document ends at its EOS; ids count the EOS tokens before each position
        length = self.seq_len_at(step) if step is not None else self.seq_len
        if length < self.seq_len:
            pieces = self.seq_len // length
            tokens = np.stack(
                [tokens[:, j * length : j * length + length + 1] for j in range(pieces)], axis=1
            ).reshape(len(indices) * pieces, length + 1)
        documents = ids_after_ends(tokens, self.eos)
        batch_transform = getattr(self.objective, "batch", None)
        if batch_transform is not None and not self.random:
            arrays = batch_transform(tokens, documents)
        else:
            rows = []
            repeat = tokens.shape[0] // len(indices)
            for row in range(tokens.shape[0]):
                rng = None
                if self.random:  # seeding costs more than reading a sample: only when used
                    index = indices[row // repeat]
                    rng = np.random.default_rng([self.seed, SAMPLE_SEED_SALT, index, row % repeat])
                rows.append(self.objective(tokens[row], documents[row], rng))
            arrays = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
        batch = {
            key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()
        }
        batch["index"] = torch.arange(indices.start, indices.stop)  # global sample indices
        return batch

    def micro_batch_indices(self, number: int) -> range:
        """Global indices of this rank's `number`-th micro-batch since the cursor."""
        b = self.batching
        step, micro = divmod(number, b.accumulation)
        start = self.cursor + step * b.global_batch + micro * b.micro_batch * b.world
        start += b.rank * b.micro_batch
        return range(start, start + b.micro_batch)

    def __iter__(self) -> Iterator[Any]:
        """In the main process: micro-batches. In a DataLoader worker: for each block of
        `TRANSFER_BLOCK` consecutive micro-batches (worker w of n takes blocks w, w + n, ...),
        one tuple of stacked runs of equally shaped micro-batches: every tensor crossing
        between processes costs a shared-memory segment and a file descriptor, so sending a
        few large tensors instead of many small ones is what keeps workers fast."""
        info = get_worker_info()
        total = None if self.num_steps is None else self.num_steps * self.batching.accumulation
        if info is None:
            number = 0
            while total is None or number < total:
                yield self.numbered_micro_batch(number)
                number += 1
            return
        block = info.id
        while total is None or block * TRANSFER_BLOCK < total:
            first = block * TRANSFER_BLOCK
            last = first + TRANSFER_BLOCK if total is None else min(first + TRANSFER_BLOCK, total)
            batches = [self.numbered_micro_batch(number) for number in range(first, last)]
            yield tuple(_stack_runs(batches))
            block += info.num_workers

    def numbered_micro_batch(self, number: int) -> dict[str, torch.Tensor]:
        step = self.start_step + number // self.batching.accumulation
        return self.micro_batch(self.micro_batch_indices(number), step)


def _stack_runs(batches: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive micro-batches with the same keys and shapes, stacked along a new dim 0."""
    run: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        if run and {k: v.shape for k, v in batch.items()} != {
            k: v.shape for k, v in run[0].items()
        }:
            yield {key: torch.stack([b[key] for b in run]) for key in run[0]}
            run = []
        run.append(batch)
    if run:
        yield {key: torch.stack([b[key] for b in run]) for key in run[0]}


class MicroBatches:
    """Iterates a rank's micro-batches, unpacking what DataLoader workers send in blocks."""

    def __init__(self, dataloader: DataLoader) -> None:
        self.dataloader = dataloader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.dataloader.num_workers == 0:
            if self.dataloader.pin_memory:
                yield from self.dataloader
            else:  # nothing for the DataLoader to do in this process: skip its machinery
                yield from self.dataloader.dataset  # type: ignore[misc]
            return
        for runs in self.dataloader:
            for stacked in runs:
                for k in range(stacked["index"].shape[0]):
                    yield {key: value[k] for key, value in stacked.items()}


@dataclass
class Loader:
    """A rank's DataLoader and what the trainer needs to know about it."""

    loader: MicroBatches  # iterate it for this rank's micro-batches, in order
    dataset: ShardDataset
    state: LoaderState
    manifest: Manifest
    skipped_shards: list[str]

    def state_after(self, steps: int) -> LoaderState:
        """The state to checkpoint after `steps` optimizer steps of this loader."""
        b = self.dataset.batching
        return LoaderState(
            samples=self.state.samples + steps * b.global_batch,
            steps=self.state.steps + steps,
            segments=list(self.state.segments),
            tokenizer_sha256=self.state.tokenizer_sha256,
            seq_len=self.state.seq_len,
            window=self.state.window,
            seed=self.state.seed,
        )

    def sources_of(self, index: torch.Tensor) -> torch.Tensor:
        """The source of each global sample in `index` (a batch's `index`): its position in
        `dataset.sources`, (n,) int64."""
        order = self.dataset.order()
        return torch.tensor([order.lookup(i)[0] for i in index.tolist()], dtype=torch.int64)

    def ledger(self, steps: int) -> dict[str, dict[str, float]]:
        """Per source after `steps` more steps: samples and tokens consumed, epochs of its
        training tokens (the data ledger)."""
        dataset = self.dataset
        consumed = dataset.order().consumed(
            self.state.samples + steps * dataset.batching.global_batch
        )
        ledger = {}
        for name, stream in zip(dataset.sources, dataset.streams(), strict=True):
            tokens = consumed[name] * dataset.stride
            ledger[name] = {
                "samples": consumed[name],
                "tokens": tokens,
                "epochs": tokens / stream.epoch_length,
            }
        return ledger


def check_shards(
    out_dir: Path, manifest: Manifest, verify: str, on_bad: str, split: str = "train"
) -> tuple[dict[str, list[ShardRecord]], list[str]]:
    """The split's shards per source, in manifest order, after the configured checks.

    Every rank runs the same checks on the same files, so with `on_bad="skip"` all ranks drop
    the same shards. Missing files and wrong sizes are always checked; `verify="shard"` also
    compares sha256s; `verify="sample"` both compares sha256s and parses every tar's headers
    and arrays' layout (`on_bad="skip"` parses them too), so a corrupt shard is found now
    rather than mid-run. Token ids beyond the tokenizer are found as blocks are read.
    """
    shards: dict[str, list[ShardRecord]] = {}
    skipped: list[str] = []
    problems: dict[str, str] = {}  # local path: what is wrong with that shard
    for record in manifest.shards:
        if record.split != split:
            continue
        path = out_dir / record.path
        problem = None
        if not path.is_file():
            problem = "missing"
        elif path.stat().st_size != record.bytes:
            problem = f"{path.stat().st_size} bytes, the manifest says {record.bytes}"
        elif verify in ("shard", "sample") and sha256_file(path) != record.sha256:
            problem = "sha256 differs from the manifest"
        elif on_bad == "skip" or verify == "sample":
            try:
                ShardIndex(path, record)
            except ShardFormatError as error:
                problem = str(error)
        if problem is None:
            shards.setdefault(record.source, []).append(record)
        elif on_bad == "skip":
            skipped.append(f"{path}: {problem}")
            problems[str(path)] = f"{record.path} ({problem})"
        else:
            raise DataError(f"shard {path}: {problem} (data.on_bad_shard=skip skips bad shards)")
    # each evaluation checks anew, and every rank: said once per run, on rank 0 (a remote
    # shard that could not be fetched was said by `remote.mirror` under the same key)
    new = [problems[key] for key in first_time(problems)]
    if new and is_rank_zero():
        log.warning("skipping %d shard(s) of %s: %s", len(new), out_dir, ", ".join(new))
    missing = [source for source in manifest.weights if source not in shards]
    if missing and (split == "train" or not shards):
        raise DataError(f"source {missing[0]!r} has no usable {split} shards in {out_dir}")
    # a source too small to hold documents out: the others are still evaluated
    if missing and first_time([f"no {split} {missing} {out_dir}"]) and is_rank_zero():
        log.warning("evaluating without source(s) %s: no usable %s shards in %s", missing, split,
                    out_dir)  # fmt: skip
    return dict(
        sorted(shards.items(), key=lambda item: list(manifest.weights).index(item[0]))
    ), skipped


def build_loader(
    cfg: Any,
    objective: Objective,
    *,
    rank: int = 0,
    world: int = 1,
    state: LoaderState | None = None,
    num_steps: int | None = None,
    causal: bool = True,
    split: str = "train",
) -> Loader:
    """A DataLoader of this rank's micro-batches from `cfg.data.path`.

    Args:
        cfg: the run's `KilnConfig` (data, model).
        objective: the transform for `cfg.objective` (see `pretrain.objectives`).
        rank, world: this data-parallel rank and the number of them.
        state: the loader state from a checkpoint; None starts at sample 0.
        num_steps: stop after this many optimizer steps (None: never stop).
        causal: consecutive samples overlap by one token (the last target is the next
            sample's first input), as in Megatron's GPT dataset.
        split: "train", or "val" for the held-out shards (evaluation).
    """
    data = cfg.data
    out_dir = data_directory(data)
    manifest = open_manifest(cfg, out_dir)
    tokenizer = manifest.tokenizer
    if state is not None and state.tokenizer_sha256 and state.tokenizer_sha256 != tokenizer.sha256:
        raise DataError(
            f"{out_dir}/manifest.json comes from another tokenizer (sha256 "
            f"{tokenizer.sha256[:12]}...) than the checkpoint's data ({state.tokenizer_sha256[:12]}...)"
        )
    if data.global_batch_size % (data.micro_batch_size * world):
        raise DataError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of "
            f"data.micro_batch_size={data.micro_batch_size} x {world} ranks"
        )
    shards, skipped = check_shards(out_dir, manifest, data.verify, data.on_bad_shard, split)
    weights = dict(manifest.weights)
    if split == "train":  # the held-out set keeps the build's weights: evaluations under
        # another data.mixture (an ablation, a change on resume) compare on the same samples
        weights |= {name: float(w) for name, w in data.mixture.items()}
    weights = {name: weights[name] for name in shards}
    state = state or LoaderState(tokenizer_sha256=tokenizer.sha256, seq_len=data.seq_len)
    if not state.segments:
        state.segments = [Segment(start=state.samples, weights=weights)]
    current = state.segments[-1]
    say = log.warning if rank == 0 else log.debug  # said once, not once per rank
    # The order's seed stays the run's: the sources' streams (their shard orders) depend on
    # it, and with another one the samples each source gave would be other tokens.
    seed = data.seed if state.seed is None else state.seed
    if seed != data.seed:
        say("data.seed=%d is not applied on resume: the run keeps its data order (seed %d); a "
            "new order needs a new run", data.seed, seed)  # fmt: skip
    window = state.window or data.shuffle_buffer
    new_mixture = _normalised(current.weights) != _normalised(weights)
    new_length = bool(state.seq_len) and state.seq_len != data.seq_len
    new_window = window != data.shuffle_buffer
    if new_mixture or new_length or new_window:
        previous = GlobalOrder(list(current.weights), current, window, seed)
        # Within a window each source's slots are shuffled: part-way through one, a source
        # has given some of the window's samples, not its first ones. The new segment starts
        # after the whole window (its unread samples are left, none read twice).
        boundary = current.start + -(-(state.samples - current.start) // window) * window
        base = previous.consumed(boundary)
        if boundary > state.samples:
            say("the new data order starts after the current shuffle window: %d samples of it "
                "are left unread, so none is read twice", boundary - state.samples)  # fmt: skip
        if new_window:
            say("data.shuffle_buffer changes at global sample %d: %d -> %d", state.samples,
                window, data.shuffle_buffer)  # fmt: skip
        if new_mixture:
            say(
                "mixture weights change at global sample %d: %s -> %s", state.samples,
                current.weights, weights,
            )  # fmt: skip
        if new_length:  # context extension: count what each source gave in samples of the new
            # length, rounded up, so the new samples start where the old ones stopped
            old = _stride(objective, state.seq_len, causal)
            new = _stride(objective, data.seq_len, causal)
            base = {name: -(-count * old // new) for name, count in base.items()}
            say(
                "data.seq_len changes at global sample %d: %d -> %d; each source continues "
                "after the tokens of the current shuffle window",
                state.samples, state.seq_len, data.seq_len,
            )  # fmt: skip
            state.seq_len = data.seq_len
        current = Segment(state.samples, weights, base, current.number + 1)
        state.segments.append(current)
    state.window, state.seed = data.shuffle_buffer, seed
    eos = tokenizer.special_ids["eos"]
    raw = objective.raw_length(data.seq_len)
    dataset = ShardDataset(
        out_dir,
        shards,
        objective,
        seq_len=data.seq_len,
        stride=raw - 1 if causal else raw,
        batching=Batching(data.global_batch_size, data.micro_batch_size, rank, world),
        segment=current,
        cursor=state.samples,
        num_steps=num_steps,
        start_step=state.steps,
        # evaluation reads whole sequences at every step: its loss stays comparable across
        # the warmup (it started at step 0's short rows every time)
        warmup=(
            data.seq_len_warmup_steps if causal and split == "train" else 0,
            data.seq_len_warmup_start,
        ),  # fmt: skip
        window=data.shuffle_buffer,
        seed=seed,
        eos=eos,
        vocab_size=tokenizer.vocab_size,
    )
    workers = data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,  # blocks of TRANSFER_BLOCK micro-batches
        persistent_workers=False,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
        worker_init_fn=_leave_the_stop_to_the_rank if workers else None,
    )
    return Loader(MicroBatches(loader), dataset, state, manifest, skipped)


def _leave_the_stop_to_the_rank(_worker: int) -> None:
    """In each DataLoader worker: ignore the first SIGTERM, die of the second.

    A SIGTERM meant as "finish the step, save, exit 42" reaches the workers too: torchrun
    signals each rank's process group, and Slurm (`scancel --signal=TERM`, the preemption
    warning) every process of the step. A worker that died of it would end its rank at the next
    batch ("DataLoader worker ... is killed by signal: Terminated") before it saved. Its rank
    shuts it down once saved; a second SIGTERM (its DataLoader terminating a stuck worker, or
    multiprocessing's at exit) still ends it. torch's own handler, replaced here, exits only
    for a SIGTERM from the rank itself."""

    def first(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, first)


def _stride(objective: Objective, seq_len: int, causal: bool) -> int:
    """Stream tokens a sample advances by: causal samples overlap the next by one token."""
    raw = objective.raw_length(seq_len)
    return raw - 1 if causal else raw


def data_directory(data: Any) -> Path:
    """The local directory of `data.path`: the path itself, or, for a URL or `pipe:` command,
    its mirror in the local cache (fetched and checked first; see `pretrain/data/remote.py`)."""
    from pretrain.data import remote

    if not remote.is_remote(data.path):
        return remote.local_path(data.path)
    try:
        return remote.mirror(data.path, getattr(data, "cache_dir", "") or None, data.on_bad_shard)
    except remote.FetchError as error:
        raise DataError(str(error)) from error


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: round(w / total, 12) for name, w in sorted(weights.items())}


def build_run_loader(
    cfg: Any,
    *,
    rank: int = 0,
    world: int = 1,
    state: LoaderState | None = None,
    num_steps: int | None = None,
    split: str = "train",
) -> Loader:
    """`build_loader` with the objective `cfg.objective` names, built from the manifest's
    tokenizer (special ids, sentinels; word starts for whole-word masking)."""
    from pretrain.config import CausalLMConfig, MaskedLMConfig
    from pretrain.objectives import SpecialIds, build_objective, word_starts_from_sentencepiece

    out_dir = data_directory(cfg.data)
    manifest = open_manifest(cfg, out_dir)
    word_start = None
    if isinstance(cfg.objective, MaskedLMConfig) and cfg.objective.whole_word:
        word_start = word_starts_from_sentencepiece(out_dir / manifest.tokenizer.path)
    try:
        objective = build_objective(
            cfg.objective,
            SpecialIds.from_manifest(manifest.tokenizer),
            manifest.tokenizer.vocab_size,  # random MLM replacements stay in the tokenizer
            document_masking=cfg.data.document_masking,
            reset_position_ids=cfg.data.reset_position_ids,
            word_start=word_start,
        )
        objective.raw_length(cfg.data.seq_len)  # configuration errors now, not in a worker
    except ValueError as error:
        raise DataError(str(error)) from error
    causal = isinstance(cfg.objective, CausalLMConfig)
    return build_loader(cfg, objective, rank=rank, world=world, state=state,
                        num_steps=num_steps, causal=causal, split=split)  # fmt: skip
