"""The shard format: exact round trips through our reader, webdataset and Ray Data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.shards import (
    Manifest,
    ShardFormatError,
    TokenizerRecord,
    iter_blocks,
    iter_documents,
    read_manifest,
    verify_shard,
    write_manifest,
    write_shard,
)


def make_blocks(seed: int, vocab: int = 4096) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(0, vocab, size=int(n)) for n in rng.integers(1, 300, size=int(k))]
        for k in (5, 1, 17, 3)
    ]


def flat(blocks: list[list[np.ndarray]]) -> list[list[int]]:
    return [doc.tolist() for block in blocks for doc in block]


def test_round_trip_and_record(tmp_path: Path) -> None:
    blocks = make_blocks(0)
    record = write_shard(tmp_path, "stdlib", "train", 3, blocks, vocab_size=4096)
    assert record.path == "shards/stdlib-train-00003.tar"
    assert record.documents == 26 and record.tokens == sum(len(d) for d in flat(blocks))
    assert record.dtype == "uint16" and record.source == "stdlib" and record.split == "train"
    path = tmp_path / record.path
    assert [doc.tolist() for doc in iter_documents(path)] == flat(blocks)
    keys = [key for key, _, _ in iter_blocks(path)]
    assert keys == [f"stdlib-train-00003-{i:05d}" for i in range(4)]
    verify_shard(tmp_path, record)
    assert not list(tmp_path.rglob("*.tmp"))


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    blocks = [[np.array([0, 70_000, 128_255])]]
    record = write_shard(tmp_path, "big", "val", 0, blocks, vocab_size=128_256)
    assert record.dtype == "uint32"
    [(_, tokens, _)] = iter_blocks(tmp_path / record.path)
    assert tokens.dtype == np.uint32 and tokens.tolist() == [0, 70_000, 128_255]
    with pytest.raises(ShardFormatError, match="token id 128255 outside vocab size 4096"):
        write_shard(tmp_path, "big", "val", 1, blocks, vocab_size=4096)


def test_same_tokens_give_byte_identical_shards(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a", "s", "train", 0, make_blocks(1), 4096)
    b = write_shard(tmp_path / "b", "s", "train", 0, make_blocks(1), 4096)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a" / a.path).read_bytes() == (tmp_path / "b" / b.path).read_bytes()


def test_plain_webdataset_reads_exactly_the_tokens(tmp_path: Path) -> None:
    blocks = make_blocks(2)
    record = write_shard(tmp_path, "s", "train", 0, blocks, 4096)
    dataset = wds.WebDataset(str(tmp_path / record.path), shardshuffle=False).decode()
    documents = []
    for sample in dataset:
        tokens, lengths = sample["tokens.npy"], sample["lengths.npy"]
        documents += [d.tolist() for d in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert documents == flat(blocks)


@pytest.mark.ray
def test_ray_data_reads_exactly_the_tokens(tmp_path: Path, ray_head) -> None:
    import ray

    blocks = make_blocks(3)
    record = write_shard(tmp_path, "s", "train", 0, blocks, 4096)
    ray.init(address=ray_head.address)
    try:
        rows = ray.data.read_webdataset(str(tmp_path / record.path)).take_all()
    finally:
        ray.shutdown()
    documents = []
    for row in sorted(rows, key=lambda r: r["__key__"]):
        tokens, lengths = np.asarray(row["tokens.npy"]), np.asarray(row["lengths.npy"])
        documents += [d.tolist() for d in np.split(tokens, np.cumsum(lengths)[:-1])]
    assert documents == flat(blocks)


def test_corruption_is_named(tmp_path: Path) -> None:
    record = write_shard(tmp_path, "s", "train", 0, make_blocks(4), 4096)
    path = tmp_path / record.path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFormatError, match="s-train-00000.tar"):
        verify_shard(tmp_path, record)
    with pytest.raises(ShardFormatError, match="truncated or corrupt|not a numpy array"):
        list(iter_blocks(path))
    path.unlink()
    with pytest.raises(ShardFormatError, match="missing"):
        verify_shard(tmp_path, record)


def test_manifest_round_trip_and_totals(tmp_path: Path) -> None:
    shards = [
        write_shard(tmp_path, "code", "train", 0, make_blocks(5), 4096),
        write_shard(tmp_path, "code", "val", 0, make_blocks(6), 4096),
        write_shard(tmp_path, "docs", "train", 0, make_blocks(7), 4096),
    ]
    tokenizer = TokenizerRecord(
        "tokenizer.model", "ab" * 32, 4096, "bpe", {"pad": 0, "eos": 3}, [5, 6]
    )
    manifest = Manifest("f" * 16, tokenizer, shards, {"code": 0.75, "docs": 0.25})
    write_manifest(tmp_path, manifest)
    loaded = read_manifest(tmp_path)
    assert loaded == manifest
    totals = loaded.totals()
    assert totals["code"]["train"]["tokens"] == shards[0].tokens
    assert totals["code"]["val"]["documents"] == shards[1].documents
    assert totals["docs"]["train"]["shards"] == 1
    (tmp_path / "manifest.json").write_text('{"format": "other", "version": 1}')
    with pytest.raises(ShardFormatError, match="expected 'kiln-shards' version 1"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(ShardFormatError, match="manifest.json: a JSON list, not a manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ShardFormatError, match="no manifest"):
        read_manifest(tmp_path / "elsewhere")


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ShardFormatError, match="source name 'a.b'"):
        write_shard(tmp_path, "a.b", "train", 0, make_blocks(0), 4096)
    with pytest.raises(ShardFormatError, match="split 'test'"):
        write_shard(tmp_path, "a", "test", 0, make_blocks(0), 4096)
