"""Exact and near-duplicate document removal, deterministic whatever the number of workers.

Plain Python, no Ray. The work splits in two halves:

- in the workers, per document: `content_hash` (exact) and `minhash_signature` (near), small
  picklable values that travel back to the driver or to a reducer;
- in one place, over all documents: `first_occurrence` and `near_duplicates`, which decide
  what to keep from those values and the documents' order keys alone.

An order key is any sortable, deterministic position of a document, such as
`(source, unit_id, index)`. Of each group of duplicates the document with the smallest order key
is kept, so the result does not depend on which worker finished first.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from pretrain.config import DedupConfig

OrderKey = TypeVar("OrderKey", bound=Hashable)  # sortable position of a document


# --------------------------------------------------------------------------------------------
# exact duplicates


def content_hash(text: str) -> bytes:
    """A 16-byte BLAKE2b digest of the text in Unicode NFC.

    Args:
        text: A document's text (normally already normalised; NFC is applied again so the hash
            never depends on that).

    Returns:
        The digest; equal texts, up to Unicode composition, give equal digests.
    """
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def hash_partition(digest: bytes, n_partitions: int) -> int:
    """The partition that owns a content hash, for running `first_occurrence` in parallel.

    All copies of a document share a digest and so a partition; the union of the keys kept by
    each partition is the same set `first_occurrence` returns over everything at once.
    """
    return int.from_bytes(digest[:8], "big") % n_partitions


def first_occurrence(keys: Iterable[tuple[bytes, OrderKey]]) -> set[OrderKey]:
    """The documents to keep after exact deduplication.

    Args:
        keys: `(content_hash, order_key)` for every document, in any order.

    Returns:
        For each distinct hash, the smallest order key that carries it.
    """
    first: dict[bytes, Any] = {}
    for digest, order_key in keys:
        kept = first.get(digest)
        if kept is None or order_key < kept:
            first[digest] = order_key
    return set(first.values())


# --------------------------------------------------------------------------------------------
# near duplicates

# datasketch's default (since 2.0) permutation scheme: 32-bit values, so a signature is
# num_perm * 4 bytes (512 B at 128 permutations). Near dedup holds every signature of the corpus
# plus an LSH index of similar size in one process: about 1 GiB per million documents.
MINHASH_SCHEME = "affine32"
_HASH_BATCH = 4096  # shingles hashed per update: bounds the (batch, num_perm) array to 2 MiB
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """MinHash permutation parameters, generated once per (num_perm, seed) in each process."""
    permutations = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations
    permutations.setflags(write=False)  # shared by every MinHash built in this process
    return permutations


def shingles(text: str, cfg: DedupConfig) -> list[bytes]:
    """The distinct word shingles of a text, in first-seen order, UTF-8 encoded.

    A text shorter than one shingle is a single shingle (an empty text: the empty shingle).
    """
    if cfg.shingle_unit == "whitespace":
        tokens = text.split()
    elif cfg.shingle_unit == "word":
        tokens = _WORD.findall(text.lower())
    else:
        raise ValueError(
            f"dedup.shingle_unit must be 'whitespace' or 'word', got {cfg.shingle_unit!r}"
        )
    n = cfg.shingle_size
    joined = (" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1)))
    return [shingle.encode("utf-8", "surrogatepass") for shingle in dict.fromkeys(joined)]


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The MinHash signature of one document, computed in the worker.

    Args:
        text: The document text.
        cfg: Shingling, number of permutations and seed.

    Returns:
        A (num_perm,) uint32 array: the `hashvalues` of a datasketch `MinHash`. Picklable.
    """
    minhash = MinHash(
        num_perm=cfg.num_perm,
        seed=cfg.seed,
        permutations=_permutations(cfg.num_perm, cfg.seed),
        scheme=MINHASH_SCHEME,
    )
    document_shingles = shingles(text, cfg)
    for start in range(0, len(document_shingles), _HASH_BATCH):
        minhash.update_batch(document_shingles[start : start + _HASH_BATCH])
    return np.ascontiguousarray(minhash.hashvalues)


def lsh_params(cfg: DedupConfig) -> tuple[int, int] | None:
    """The explicit `(bands, rows)` of the config, checked; None to derive them from threshold."""
    if cfg.bands is None and cfg.rows is None:
        return None
    if cfg.bands is None or cfg.rows is None:
        raise ValueError("dedup.bands and dedup.rows must be set together (or both left null)")
    if cfg.bands < 2 or cfg.rows < 1:
        raise ValueError(
            f"dedup.bands must be >= 2 and dedup.rows >= 1, got {cfg.bands}, {cfg.rows}"
        )
    if cfg.bands * cfg.rows > cfg.num_perm:
        raise ValueError(
            f"dedup.bands * dedup.rows = {cfg.bands * cfg.rows} exceeds dedup.num_perm = {cfg.num_perm}"
        )
    return cfg.bands, cfg.rows


def build_lsh(cfg: DedupConfig) -> MinHashLSH:
    """An empty in-memory MinHash LSH index with the configured banding."""
    # datasketch draws a storage name from the global `random` module even for in-memory
    # storage; restore its state so deduplication leaves other users of `random` undisturbed.
    state = random.getstate()
    try:
        return MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=lsh_params(cfg))
    finally:
        random.setstate(state)


def near_duplicates(
    signatures: Iterable[tuple[OrderKey, np.ndarray]], cfg: DedupConfig
) -> set[OrderKey]:
    """The documents to drop as near duplicates of an earlier kept document.

    Documents are visited in order-key order. Each is looked up in an LSH index of the
    documents kept so far; if a candidate's estimated Jaccard similarity is at least
    `cfg.threshold` the document is dropped, else it is kept and indexed. The result is the
    same whatever the order of `signatures`.

    Args:
        signatures: `(order_key, minhash_signature(...))` for every document; keys are unique.
        cfg: Threshold, banding, number of permutations and seed (as used for the signatures).

    Returns:
        The order keys of the dropped documents.
    """
    ordered = sorted(signatures, key=itemgetter(0))
    for (key, _), (next_key, _) in zip(ordered, ordered[1:], strict=False):
        if key == next_key:
            raise ValueError(f"near_duplicates: order key {key!r} appears more than once")
    lsh = build_lsh(cfg)
    kept: dict[Any, LeanMinHash] = {}
    dropped: set[Any] = set()
    for key, signature in ordered:
        minhash = LeanMinHash(seed=cfg.seed, hashvalues=signature, scheme=MINHASH_SCHEME)
        # The LSH only proposes candidates; the signature estimate confirms them.
        if any(minhash.jaccard(kept[other]) >= cfg.threshold for other in lsh.query(minhash)):
            dropped.add(key)
        else:
            lsh.insert(key, minhash, check_duplication=False)
            kept[key] = minhash
    return dropped


# --------------------------------------------------------------------------------------------
# accounting


@dataclass
class DedupStats:
    """Documents of one source removed by deduplication."""

    exact_removed: int = 0  # identical text to a document with a smaller order key
    near_removed: int = 0  # near duplicate of a kept document with a smaller order key


def count_removed(
    exact_removed: Iterable[OrderKey],
    near_removed: Iterable[OrderKey],
    source_of: Callable[[Any], str] = itemgetter(0),
) -> dict[str, DedupStats]:
    """Removed documents counted per source.

    Args:
        exact_removed: Order keys dropped as exact duplicates.
        near_removed: Order keys dropped as near duplicates.
        source_of: The source name of an order key (default: its first element).

    Returns:
        Source name -> counts, sorted by source name.
    """
    stats: dict[str, DedupStats] = {}
    for key in exact_removed:
        stats.setdefault(source_of(key), DedupStats()).exact_removed += 1
    for key in near_removed:
        stats.setdefault(source_of(key), DedupStats()).near_removed += 1
    return dict(sorted(stats.items()))
