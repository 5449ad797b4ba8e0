"""Which documents go into which shard, in which order (`stages.plan_shards`), on made-up
token counts: shuffled within stretches of the global order, whatever the work units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.stages import UnitRef, _save_npz, plan_shards

N_DOCS = 400
VOCAB = 1000  # uint16 tokens: 2 bytes each
CAP_BYTES = 2000  # 1000 tokens a shard, about 40 documents


@pytest.fixture(scope="module")
def documents() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.integers(1, 50, N_DOCS), (rng.random(N_DOCS) < 0.2).astype(np.uint8)


def planned(work: Path, documents: tuple[np.ndarray, np.ndarray], unit_docs: int,
            **options: int) -> list[list[int]]:  # fmt: skip
    """Per shard of the one source's train split, the documents' global numbers in order, the
    documents cut into units of `unit_docs`."""
    lengths, split = documents
    refs, first_doc = [], {}
    for number, start in enumerate(range(0, N_DOCS, unit_docs)):
        unit_id = f"u{unit_docs}-{number}"
        _save_npz(work / "tokens" / f"{unit_id}.npz", lengths=lengths[start : start + unit_docs],
                  split=split[start : start + unit_docs])  # fmt: skip
        refs.append(UnitRef(unit_id, "web", 0, number))
        first_doc[unit_id] = start
    specs = plan_shards(work, refs, ["web"], CAP_BYTES, VOCAB, **options)
    for part in ("train", "val"):  # shards numbered from 0 in each
        numbers = [spec.index for spec in specs if spec.split == part]
        assert numbers == list(range(len(numbers)))
    return [
        [first_doc[unit] + position for unit, positions in spec.pieces for position in positions]
        for spec in specs
        if spec.split == "train"
    ]


def test_documents_are_shuffled_within_stretches_whatever_the_units(
    documents: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A sorted corpus (by site, date) would otherwise give batches of neighbours; and the
    outputs must not depend on `shards.unit_bytes`."""
    train = [doc for doc in range(N_DOCS) if documents[1][doc] == 0]
    small = planned(tmp_path, documents, 7, shuffle_shards=3, seed=0)
    large = planned(tmp_path, documents, 61, shuffle_shards=3, seed=0)
    assert small == large
    order = [doc for shard in small for doc in shard]
    assert sorted(order) == train and order != train  # each train document once, shuffled
    # a stretch of 3 shards' worth of tokens (3000) is shuffled in itself: nothing crosses it
    starts = np.concatenate([[0], np.cumsum(documents[0][train])[:-1]]) // 3000
    stretch_of = dict(zip(train, starts.tolist(), strict=True))
    assert [stretch_of[doc] for doc in order] == sorted(stretch_of[doc] for doc in order)
    for shard in small[:-1]:  # each shard closes at 1000 tokens
        assert 1000 <= documents[0][shard].sum() < 1000 + 50
    assert planned(tmp_path, documents, 7, shuffle_shards=3, seed=1) != small


def test_shuffle_shards_0_keeps_the_global_order(
    documents: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    order = [doc for shard in planned(tmp_path, documents, 7, shuffle_shards=0) for doc in shard]
    assert order == [doc for doc in range(N_DOCS) if documents[1][doc] == 0]
