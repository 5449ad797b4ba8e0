"""The work of each `kiln data` stage on one unit, as plain functions of files in a work directory.

No Ray here: `data_pipeline.pipeline` runs these functions as Ray tasks, and tests call them
directly. Every function reads its inputs from the work directory, writes its outputs there
under temporary names renamed when complete, and writes a small JSON *marker* last. A marker's
presence means the unit's stage is done, which is all that resuming after a crash needs.

Work directory (`OUT/.work/`), per unit `U` (a `WorkUnit.unit_id`):

    scan/U.jsonl.zst   kept documents after normalize + filters: {"id", "text"} per line
    scan/U.npz         per kept document: content hash, MinHash signature, UTF-8 bytes,
                       split key (a hash of source and doc id, for the validation split)
    scan/U.json        marker: documents read, skipped by reason, dropped per filter, timing
    select.json        what dedup removes, what is held out, what the tokenizer trains on
    tokens/U.npy       token ids of the unit's surviving documents, concatenated in order
    tokens/U.npz       per surviving document: token count, split (0 train, 1 val)
    tokens/U.json      marker: documents and tokens per split, timing
    shards/NAME.json   marker: the shard's manifest record

A worker holds one unit at a time (or one shard), so its memory is bounded by
`shards.unit_bytes` and `shards.target_bytes`, not by the size of the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from data_pipeline.dedup import content_hash, first_occurrence, minhash_signature, near_duplicates
from data_pipeline.filters import FILTER_NAMES, apply_filters, normalize
from data_pipeline.shards import (
    SPLITS,
    ShardRecord,
    atomic_write_bytes,
    sha256_file,
    temporary_name,
    token_dtype,
    write_shard,
)
from data_pipeline.sources import SkipCounter, WorkUnit, read_unit
from pretrain.config import DedupConfig, FilterConfig, NormalizeConfig

ENCODE_BATCH_BYTES = 1 << 20  # text encoded per SentencePiece call: bounds the id lists held


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


# --------------------------------------------------------------------------------------------
# scan: read -> normalize -> filter -> hash


@dataclass(frozen=True)
class ScanSettings:
    """What the scan stage needs from the config (small and picklable for Ray)."""

    normalize: NormalizeConfig
    filters: FilterConfig
    dedup: DedupConfig
    max_doc_bytes: int


def split_key(source: str, doc_id: str) -> int:
    """A uniform 64-bit hash of a document's identity; documents below a cut go to `val`.

    It depends on the source name and doc id only (not on the text or the worker), so a
    document lands in the same split in every run, and edits to a document do not move it.
    """
    digest = hashlib.blake2b(f"{source}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def scan_unit(unit: WorkUnit, settings: ScanSettings, work: Path) -> dict[str, Any]:
    """Read, normalize and filter one unit; hash the documents that pass.

    Returns the marker written to `scan/U.json`: documents read and skipped (per reason, per
    file), documents dropped per filter, documents kept and their bytes, seconds, peak RSS.
    """
    start = time.perf_counter()
    counter = SkipCounter()
    filtered = dict.fromkeys(FILTER_NAMES, 0)
    ids: list[str] = []
    hashes: list[bytes] = []
    signatures: list[np.ndarray] = []
    sizes: list[int] = []
    keys: list[int] = []
    bytes_in = 0
    text_path = work / "scan" / f"{unit.unit_id}.jsonl.zst"
    text_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(text_path)
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for doc in read_unit(unit, counter, settings.max_doc_bytes):
            size = len(doc.text.encode("utf-8", "surrogatepass"))
            bytes_in += size
            text = normalize(doc.text, settings.normalize)
            reason = apply_filters(text, settings.filters)
            if reason is not None:
                filtered[reason] += 1
                continue
            record = {"id": doc.doc_id, "text": text}
            out.write(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            out.write(b"\n")
            ids.append(doc.doc_id)
            hashes.append(content_hash(text))
            if settings.dedup.near:
                signatures.append(minhash_signature(text, settings.dedup))
            sizes.append(len(text.encode("utf-8", "surrogatepass")))
            keys.append(split_key(unit.source, doc.doc_id))
        out.flush(zstandard.FLUSH_FRAME)
        raw.flush()
        os.fsync(raw.fileno())
    tmp.replace(text_path)
    n_perm = settings.dedup.num_perm if settings.dedup.near else 0
    _save_npz(
        work / "scan" / f"{unit.unit_id}.npz",
        hashes=np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), 16),
        signatures=(
            np.stack(signatures) if signatures else np.zeros((len(ids), n_perm), np.uint32)
        ),
        nbytes=np.array(sizes, dtype=np.int64),
        split_key=np.array(keys, dtype=np.uint64),
    )
    marker = {
        "unit_id": unit.unit_id,
        "source": unit.source,
        "kept": len(ids),
        "kept_bytes": int(sum(sizes)),
        "bytes_in": bytes_in,
        "skips": counter.to_dict(),
        "filtered": filtered,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": peak_rss_mib(),
    }
    write_json(work / "scan" / f"{unit.unit_id}.json", marker)
    return marker


def iter_unit_texts(work: Path, unit_id: str) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of a unit's kept documents, in order, from `scan/U.jsonl.zst`."""
    with open(work / "scan" / f"{unit_id}.jsonl.zst", "rb") as raw:
        reader = io.TextIOWrapper(
            zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", newline="\n"
        )
        for line in reader:
            record = json.loads(line)
            yield record["id"], record["text"]


# --------------------------------------------------------------------------------------------
# select: dedup, validation split and tokenizer sample, over the whole corpus


@dataclass(frozen=True)
class UnitRef:
    """A unit's place in the global order: sources in config order, units, documents."""

    unit_id: str
    source: str
    source_pos: int
    index: int


@dataclass
class SelectSettings:
    dedup: DedupConfig
    val_fraction: float
    sample_bytes: int  # tokenizer sample budget; 0 = no sample (tokenizer.path given)
    weights: dict[str, float] = field(default_factory=dict)


def select(units: Sequence[UnitRef], settings: SelectSettings, work: Path) -> dict[str, Any]:
    """Decide, for every kept document, whether dedup drops it, its split, and whether the
    tokenizer trains on it. Writes and returns `select.json`.

    - Exact duplicates: of each group of identical texts (after normalisation) the one first
      in the global order stays, across sources too (earlier sources win).
    - Near duplicates: among the rest, in global order, a document whose estimated Jaccard
      similarity to an already kept document reaches `dedup.threshold` is dropped.
    - Split: documents whose `split_key` falls below `val_fraction` of the 64-bit range are
      held out; a source with two or more documents but none below the cut holds out its
      lowest one, so every source has validation data when `val_fraction > 0`.
    - Tokenizer sample: `sample_bytes` is shared between sources by weight; within a source
      training documents are taken in content-hash order (a deterministic pseudo-random order)
      while they fit the source's budget, so the sample is bounded whatever the corpus size.

    Everything depends on the global order and the data only, never on the workers.
    """
    start = time.perf_counter()
    per_unit: dict[str, dict[str, np.ndarray]] = {}
    for ref in units:
        per_unit[ref.unit_id] = _load_npz(work / "scan" / f"{ref.unit_id}.npz")
    # order key (source_pos, unit index, doc index): sortable, unique, worker-independent
    source_of: dict[tuple[int, int, int], str] = {}
    unit_of: dict[tuple[int, int], str] = {}
    digests: dict[tuple[int, int, int], bytes] = {}
    for ref in units:
        unit_of[(ref.source_pos, ref.index)] = ref.unit_id
        for doc, digest in enumerate(per_unit[ref.unit_id]["hashes"]):
            key = (ref.source_pos, ref.index, doc)
            digests[key] = digest.tobytes()
            source_of[key] = ref.source
    exact: set[tuple[int, int, int]] = set()
    if settings.dedup.exact:
        exact = set(digests) - first_occurrence((digest, key) for key, digest in digests.items())
    near: set[tuple[int, int, int]] = set()
    if settings.dedup.near:
        signatures = [
            (key, per_unit[unit_of[key[:2]]]["signatures"][key[2]])
            for key in digests
            if key not in exact
        ]
        near = near_duplicates(signatures, settings.dedup)
    survivors = sorted(set(digests) - exact - near)

    cut = int(settings.val_fraction * float(1 << 64))
    val: set[tuple[int, int, int]] = set()
    lowest: dict[str, tuple[int, tuple[int, int, int]]] = {}
    count: dict[str, int] = {}
    for key in survivors:
        split_value = int(per_unit[unit_of[key[:2]]]["split_key"][key[2]])
        source = source_of[key]
        count[source] = count.get(source, 0) + 1
        if split_value < cut:
            val.add(key)
        if source not in lowest or (split_value, key) < lowest[source]:
            lowest[source] = (split_value, key)
    if settings.val_fraction > 0:
        with_val = {source_of[key] for key in val}
        for source, (_, key) in lowest.items():
            if source not in with_val and count[source] >= 2:
                val.add(key)

    sample: set[tuple[int, int, int]] = set()
    sample_bytes: dict[str, int] = {}
    if settings.sample_bytes > 0:
        total_weight = sum(settings.weights.values())
        candidates: dict[str, list[tuple[bytes, tuple[int, int, int]]]] = {}
        for key in survivors:
            if key not in val:
                candidates.setdefault(source_of[key], []).append((digests[key], key))
        for source, items in candidates.items():
            budget = int(settings.sample_bytes * settings.weights[source] / total_weight)
            used = 0
            for _, key in sorted(items):
                size = int(per_unit[unit_of[key[:2]]]["nbytes"][key[2]])
                if used + size <= budget:
                    sample.add(key)
                    used += size
            sample_bytes[source] = used

    result: dict[str, Any] = {"units": {}, "sources": {}}
    for ref in units:
        entry = {"exact": [], "near": [], "val": [], "sample": []}
        for doc in range(len(per_unit[ref.unit_id]["hashes"])):
            key = (ref.source_pos, ref.index, doc)
            for name, chosen in (
                ("exact", exact),
                ("near", near),
                ("val", val),
                ("sample", sample),
            ):
                if key in chosen:
                    entry[name].append(doc)
        result["units"][ref.unit_id] = entry
    for ref in units:
        stats = result["sources"].setdefault(
            ref.source,
            {"exact_duplicates": 0, "near_duplicates": 0, "sample_documents": 0},
        )
        entry = result["units"][ref.unit_id]
        stats["exact_duplicates"] += len(entry["exact"])
        stats["near_duplicates"] += len(entry["near"])
        stats["sample_documents"] += len(entry["sample"])
    for source, used in sample_bytes.items():
        result["sources"][source]["sample_bytes"] = used
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()
    write_json(work / "select.json", result)
    return result


def gather_sample(work: Path, unit_id: str, indices: Sequence[int]) -> list[str]:
    """The texts of a unit's documents chosen for the tokenizer sample, in document order."""
    wanted = set(indices)
    return [text for doc, (_, text) in enumerate(iter_unit_texts(work, unit_id)) if doc in wanted]


# --------------------------------------------------------------------------------------------
# tokenize


@lru_cache(maxsize=2)
def _processor(
    path: str, sha256: str
) -> tuple[Any, dict[int, str]]:  # sha256: a new model, a new entry
    from data_pipeline.tokenizer import load_processor, objective_pieces

    processor = load_processor(Path(path))
    return processor, objective_pieces(processor)


def tokenize_unit(
    work: Path,
    unit_id: str,
    source: str,
    selection: dict[str, list[int]],
    tokenizer_path: str,
    tokenizer_sha256: str,
    vocab_size: int,
) -> dict[str, Any]:
    """Encode a unit's surviving documents; write `tokens/U.npy`, `tokens/U.npz`, the marker.

    Returns the marker: documents and tokens per split, seconds, peak RSS.
    """
    start = time.perf_counter()
    from data_pipeline.tokenizer import encode_as_written

    processor, reserved = _processor(tokenizer_path, tokenizer_sha256)
    dropped = set(selection["exact"]) | set(selection["near"])
    held_out = set(selection["val"])
    dtype = token_dtype(vocab_size)
    arrays: list[np.ndarray] = []
    splits: list[int] = []
    batch: list[str] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            encoded = encode_as_written(processor, batch, reserved)
            arrays.extend(ids.astype(dtype) for ids in encoded)
            batch, batch_bytes = [], 0

    for doc, (_, text) in enumerate(iter_unit_texts(work, unit_id)):
        if doc in dropped:
            continue
        splits.append(1 if doc in held_out else 0)
        batch.append(text)
        batch_bytes += len(text)
        if batch_bytes >= ENCODE_BATCH_BYTES:
            flush()
    flush()
    lengths = np.array([len(a) for a in arrays], dtype=np.uint32)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    atomic_write_bytes(work / "tokens" / f"{unit_id}.npy", buffer.getvalue())
    split_array = np.array(splits, dtype=np.uint8)
    _save_npz(work / "tokens" / f"{unit_id}.npz", lengths=lengths, split=split_array)
    marker: dict[str, Any] = {"unit_id": unit_id, "source": source, "documents": {}, "tokens": {}}
    for code, name in enumerate(SPLITS):
        mask = split_array == code
        marker["documents"][name] = int(mask.sum())
        marker["tokens"][name] = int(lengths[mask].sum(dtype=np.int64))
    marker["seconds"] = time.perf_counter() - start
    marker["peak_rss_mib"] = peak_rss_mib()
    write_json(work / "tokens" / f"{unit_id}.json", marker)
    return marker


# --------------------------------------------------------------------------------------------
# shards


@dataclass(frozen=True)
class ShardSpec:
    """One shard to write: which documents of which units, in order."""

    source: str
    split: str
    index: int
    pieces: tuple[tuple[str, tuple[int, ...]], ...]  # (unit_id, document positions in tokens/U)
    tokens: int
    documents: int

    @property
    def name(self) -> str:
        return f"{self.source}-{self.split}-{self.index:05d}"


def plan_shards(
    work: Path,
    units: Sequence[UnitRef],
    sources: Sequence[str],
    target_bytes: int,
    vocab_size: int,
    shuffle_shards: int = 0,
    seed: int = 0,
) -> list[ShardSpec]:
    """Cut each source's documents of each split into shards that close once they reach
    `target_bytes` of token data (a single larger document makes a larger shard).

    The documents come in global order, shuffled within each stretch of `shuffle_shards`
    shards' worth of tokens (seeded by `seed`, the source, the split and the stretch; 0 keeps
    the global order). A corpus is often sorted (by site, date, repository), and the loader
    shuffles only shards and a window of samples: without this, a batch would hold a few
    neighbouring documents. The stretches follow the global order, not the work units, so the
    outputs do not depend on the unit size; a shard reads the few units of its stretch."""
    cap = max(1, target_bytes // token_dtype(vocab_size).itemsize)
    stretch = cap * max(0, shuffle_shards)
    specs: list[ShardSpec] = []
    meta = {ref.unit_id: _load_npz(work / "tokens" / f"{ref.unit_id}.npz") for ref in units}
    for source in sources:
        refs = [ref for ref in units if ref.source == source]
        for code, split in enumerate(SPLITS):
            unit_of, position_of, length_of = [], [], []
            for number, ref in enumerate(refs):
                positions = np.flatnonzero(meta[ref.unit_id]["split"] == code)
                unit_of.append(np.full(positions.size, number, dtype=np.int64))
                position_of.append(positions.astype(np.int64))
                length_of.append(meta[ref.unit_id]["lengths"][positions].astype(np.int64))
            if not refs:
                continue
            unit_doc = np.concatenate(unit_of)
            positions = np.concatenate(position_of)
            lengths = np.concatenate(length_of)
            order = _stretch_order(lengths, stretch, [seed, _stable_id(source), code])
            specs.extend(_cut(source, split, refs, unit_doc[order], positions[order],
                              lengths[order], cap))  # fmt: skip
    return specs


def _stable_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _stretch_order(lengths: np.ndarray, stretch: int, seed: list[int]) -> np.ndarray:
    """Document indices in global order, permuted within each run of `stretch` tokens (by
    where each document starts)."""
    order = np.arange(lengths.size)
    if lengths.size == 0 or stretch <= 0:
        return order
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) // stretch
    bounds = np.flatnonzero(np.diff(starts)) + 1
    for number, (first, last) in enumerate(zip([0, *bounds], [*bounds, lengths.size], strict=True)):
        rng = np.random.default_rng([*seed, number])
        order[first:last] = first + rng.permutation(last - first)
    return order


def _cut(
    source: str,
    split: str,
    refs: Sequence[UnitRef],
    unit_doc: np.ndarray,
    positions: np.ndarray,
    lengths: np.ndarray,
    cap: int,
) -> list[ShardSpec]:
    """Shards of `cap` tokens from documents in this order; a shard's pieces are runs of
    documents from one unit."""
    specs: list[ShardSpec] = []
    pieces: list[tuple[str, tuple[int, ...]]] = []
    run: list[int] = []
    run_unit = -1
    tokens = documents = 0
    for unit, position, length in zip(unit_doc.tolist(), positions.tolist(), lengths.tolist(),
                                      strict=True):  # fmt: skip
        if unit != run_unit and run:
            pieces.append((refs[run_unit].unit_id, tuple(run)))
            run = []
        run_unit = unit
        run.append(position)
        tokens += length
        documents += 1
        if tokens >= cap:
            pieces.append((refs[run_unit].unit_id, tuple(run)))
            specs.append(ShardSpec(source, split, len(specs), tuple(pieces), tokens, documents))
            pieces, run, tokens, documents = [], [], 0, 0
    if run:
        pieces.append((refs[run_unit].unit_id, tuple(run)))
    if pieces:
        specs.append(ShardSpec(source, split, len(specs), tuple(pieces), tokens, documents))
    return specs


def _spec_blocks(work: Path, spec: ShardSpec, block_tokens: int) -> Iterator[list[np.ndarray]]:
    """The shard's documents grouped into blocks of about `block_tokens`, read lazily from the
    units' memory-mapped token files (a document larger than a block is a block alone)."""
    block: list[np.ndarray] = []
    block_size = 0
    opened: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # a shuffled shard comes back to units
    for unit_id, positions in spec.pieces:
        if unit_id not in opened:
            lengths = _load_npz(work / "tokens" / f"{unit_id}.npz")["lengths"].astype(np.int64)
            opened[unit_id] = (
                np.load(work / "tokens" / f"{unit_id}.npy", mmap_mode="r", allow_pickle=False),
                np.concatenate([[0], np.cumsum(lengths)]),
            )
        tokens, offsets = opened[unit_id]
        for position in positions:
            doc = np.array(tokens[offsets[position] : offsets[position + 1]])
            if block and block_size + doc.size > block_tokens:
                yield block
                block, block_size = [], 0
            block.append(doc)
            block_size += doc.size
    if block:
        yield block


def write_shard_spec(
    out_dir: Path, work: Path, spec: ShardSpec, vocab_size: int, block_tokens: int
) -> dict[str, Any]:
    """Write one shard from the units' token files, one block in memory at a time; write its
    marker; return the marker (the shard's manifest record, seconds, peak RSS)."""
    start = time.perf_counter()
    blocks = _spec_blocks(work, spec, block_tokens)
    record = write_shard(out_dir, spec.source, spec.split, spec.index, blocks, vocab_size)
    marker = {
        "record": asdict(record),
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": peak_rss_mib(),
    }
    write_json(work / "shards" / f"{spec.name}.json", marker)
    return marker


def shard_done(out_dir: Path, work: Path, spec: ShardSpec) -> ShardRecord | None:
    """The record of a shard already written by an earlier (interrupted) run, if intact."""
    marker_path = work / "shards" / f"{spec.name}.json"
    if not marker_path.is_file():
        return None
    record = ShardRecord(**read_json(marker_path)["record"])
    path = out_dir / record.path
    if not path.is_file() or sha256_file(path) != record.sha256:
        return None
    return record
