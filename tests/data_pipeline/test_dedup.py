"""Exact and near-duplicate removal: planted copies go, distinct documents stay, in any order."""

from __future__ import annotations

import dataclasses
import pickle
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.dedup import (
    DedupConfig,
    DedupStats,
    build_lsh,
    content_hash,
    count_removed,
    first_occurrence,
    hash_partition,
    minhash_signature,
    near_duplicates,
    shingles,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
Key = tuple[str, int, int]  # (source, unit_id, index)


# -- exact -----------------------------------------------------------------------------------


def test_content_hash_is_16_bytes_and_unicode_equivalent() -> None:
    composed, decomposed = content_hash("caf\u00e9"), content_hash("cafe\u0301")
    assert len(composed) == 16
    assert composed == decomposed
    assert content_hash("cafe") != composed


def _exact_keys() -> tuple[list[tuple[bytes, Key]], set[Key]]:
    """Three groups of copies spread over sources and units, plus two singletons."""
    texts = {
        ("web", 3, 7): "alpha",
        ("web", 0, 9): "alpha",
        ("code", 5, 0): "alpha",  # smallest: "code" < "web"
        ("web", 1, 2): "beta",
        ("web", 1, 1): "beta",  # smallest
        ("web", 2, 0): "gamma",  # smallest
        ("web", 2, 10): "gamma",
        ("web", 10, 0): "gamma",
        ("web", 4, 4): "delta",
        ("code", 0, 0): "epsilon",
    }
    keys = [(content_hash(text), key) for key, text in texts.items()]
    return keys, {("code", 5, 0), ("web", 1, 1), ("web", 2, 0), ("web", 4, 4), ("code", 0, 0)}


def test_first_occurrence_keeps_the_smallest_key_in_any_order() -> None:
    keys, expected = _exact_keys()
    rng = random.Random(0)
    for _ in range(20):
        rng.shuffle(keys)
        assert first_occurrence(keys) == expected


def test_first_occurrence_by_hash_partition_matches_the_whole() -> None:
    keys, expected = _exact_keys()
    partitions: list[list[tuple[bytes, Key]]] = [[] for _ in range(3)]
    for digest, key in keys:
        partitions[hash_partition(digest, 3)].append((digest, key))
    assert set().union(*(first_occurrence(part) for part in partitions)) == expected


# -- near ------------------------------------------------------------------------------------


def _distinct_stdlib_texts(count: int) -> list[str]:
    """Top-level stdlib modules of moderate size: distinct programs, not near copies."""
    texts = []
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 300 <= len(text.split()) <= 3000:
            texts.append(text)
        if len(texts) == count:
            return texts
    raise AssertionError(f"fewer than {count} suitable modules in {STDLIB}")


def _planted(n_words: int = 300) -> tuple[str, list[str]]:
    """A document and three copies with 2 of its 300 words changed (Jaccard of 5-shingles ~0.94)."""
    vocabulary = sorted(set((STDLIB / "argparse.py").read_text(encoding="utf-8").split()))
    words = random.Random(0).choices(vocabulary, k=n_words)
    copies = []
    for positions in [(10, 200), (50, 250), (120, 290)]:
        changed = list(words)
        for position in positions:
            changed[position] = f"CHANGED{position}"
        copies.append(" ".join(changed))
    return " ".join(words), copies


@pytest.fixture(scope="module")
def corpus() -> dict[Key, str]:
    """30 distinct documents in units 0 and 4, the original in unit 1, its copies after it."""
    original, copies = _planted()
    documents: dict[Key, str] = {}
    for i, text in enumerate(_distinct_stdlib_texts(30)):
        documents[("mix", 0 if i % 2 else 4, i)] = text
    documents[("mix", 1, 5)] = original
    documents[("mix", 1, 7)] = copies[0]
    documents[("mix", 2, 0)] = copies[1]
    documents[("mix", 3, 2)] = copies[2]
    return documents


PLANTED_COPIES = {("mix", 1, 7), ("mix", 2, 0), ("mix", 3, 2)}


@pytest.fixture(scope="module")
def signatures(corpus: dict[Key, str]) -> list[tuple[Key, np.ndarray]]:
    cfg = DedupConfig()
    return [(key, minhash_signature(text, cfg)) for key, text in corpus.items()]


def test_signature_is_a_picklable_deterministic_array() -> None:
    cfg = DedupConfig(num_perm=64)
    signature = minhash_signature("def f(x):\n    return x + 1", cfg)
    assert signature.shape == (64,)
    assert signature.dtype == np.uint32
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(signature)), signature)
    np.testing.assert_array_equal(minhash_signature("def f(x):\n    return x + 1", cfg), signature)
    other_seed = minhash_signature("def f(x):\n    return x + 1", dataclasses.replace(cfg, seed=2))
    assert not np.array_equal(other_seed, signature)


def test_shingle_units() -> None:
    cfg = DedupConfig(shingle_size=2)
    assert shingles("a b  a b\nc", cfg) == [b"a b", b"b a", b"b c"]  # distinct, first-seen order
    assert shingles("one", cfg) == [b"one"]
    assert shingles("", cfg) == [b""]
    words = dataclasses.replace(cfg, shingle_unit="word")
    assert shingles("Hello, World!", words) == shingles("hello world", words) == [b"hello world"]
    assert shingles("Hello, World!", cfg) != shingles("hello world", cfg)
    with pytest.raises(ValueError, match="shingle_unit"):
        shingles("x", dataclasses.replace(cfg, shingle_unit="chars"))


def test_planted_near_duplicates_are_removed_and_distinct_documents_stay(
    signatures: list[tuple[Key, np.ndarray]],
) -> None:
    assert near_duplicates(signatures, DedupConfig()) == PLANTED_COPIES


def test_near_duplicates_do_not_depend_on_input_order(
    signatures: list[tuple[Key, np.ndarray]],
) -> None:
    shuffled = list(signatures)
    for seed in range(3):
        random.Random(seed).shuffle(shuffled)
        assert near_duplicates(shuffled, DedupConfig()) == PLANTED_COPIES


def test_the_first_copy_in_key_order_is_the_one_kept(
    corpus: dict[Key, str], signatures: list[tuple[Key, np.ndarray]]
) -> None:
    """Giving a copy the smallest key of its group makes it the survivor instead."""
    renamed = [(("mix", 0, -1) if key == ("mix", 2, 0) else key, sig) for key, sig in signatures]
    assert near_duplicates(renamed, DedupConfig()) == {("mix", 1, 5), ("mix", 1, 7), ("mix", 3, 2)}


def test_explicit_banding_is_honoured(
    corpus: dict[Key, str], signatures: list[tuple[Key, np.ndarray]]
) -> None:
    derived = build_lsh(DedupConfig())
    assert (derived.b, derived.r) == (9, 13)  # datasketch's optimum for 0.8 and 128
    near_exact = DedupConfig(bands=2, rows=64)
    lsh = build_lsh(near_exact)
    assert (lsh.b, lsh.r) == (2, 64)
    # Two bands of 64 rows only pair documents whose signatures match on one whole half: the
    # 2-word variants (Jaccard ~0.94) are not proposed, an exact copy always is.
    exact_copy = (("mix", 9, 0), minhash_signature(corpus[("mix", 1, 5)], near_exact))
    assert near_duplicates([*signatures, exact_copy], near_exact) == {("mix", 9, 0)}


@pytest.mark.parametrize(
    ("bands", "rows", "message"),
    [(4, None, "together"), (1, 128, "bands must be >= 2"), (16, 9, "exceeds dedup.num_perm")],
)
def test_invalid_banding_is_refused(bands: int | None, rows: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_lsh(DedupConfig(bands=bands, rows=rows))


def test_repeated_order_key_is_refused(signatures: list[tuple[Key, np.ndarray]]) -> None:
    with pytest.raises(ValueError, match="more than once"):
        near_duplicates([*signatures, signatures[0]], DedupConfig())


def test_building_the_index_leaves_global_random_alone() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    build_lsh(DedupConfig())
    assert random.random() == expected


def test_removed_documents_are_counted_per_source() -> None:
    stats = count_removed(
        exact_removed=[("web", 0, 1), ("web", 3, 0), ("code", 1, 1)],
        near_removed=[("web", 2, 2), ("books", 0, 0)],
    )
    assert stats == {
        "books": DedupStats(exact_removed=0, near_removed=1),
        "code": DedupStats(exact_removed=1, near_removed=0),
        "web": DedupStats(exact_removed=2, near_removed=1),
    }
    assert list(stats) == ["books", "code", "web"]
