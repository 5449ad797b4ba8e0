"""Reading raw corpora: every format, every kind of bad input, byte-range splits, the stdlib."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.sources import (
    Document,
    SkipCounter,
    SourceError,
    WorkUnit,
    detect_format,
    expand_paths,
    plan_source,
    plan_units,
    read_unit,
    stdlib_dir,
)
from pretrain.config import SourceConfig

TEXTS = ["first document", "second, with ünïcode ✓", "third\nhas\nnewlines"]


def jsonl_bytes(texts: list[str], field: str = "body") -> bytes:
    return b"".join(json.dumps({field: t, "id": i}).encode() + b"\n" for i, t in enumerate(texts))


def read_source(
    paths: list[str], fmt: str = "auto", text_field: str = "body", target: int = 1 << 20, **kw
) -> tuple[list[Document], SkipCounter]:
    source = SourceConfig(name="src", paths=paths, format=fmt, text_field=text_field)
    counter = SkipCounter()
    docs = [doc for unit in plan_source(source, target) for doc in read_unit(unit, counter, **kw)]
    return docs, counter


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.jsonl.gz", "a.json.zst", "a.parquet"])
def test_every_record_format_reads_back_the_texts_in_order(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        table = pa.table({"id": [0, 1, 2], "body": TEXTS})
        pq.write_table(table, path, row_group_size=2)  # two row groups
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(TEXTS)))
    elif name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS)))
    else:
        path.write_bytes(jsonl_bytes(TEXTS))
    docs, counter = read_source([str(path)])
    assert [doc.text for doc in docs] == TEXTS
    assert {doc.source for doc in docs} == {"src"}
    assert len({doc.doc_id for doc in docs}) == 3
    assert all(doc.doc_id.startswith(f"{name}:") for doc in docs)
    assert counter.counts == {"documents_read": 3}


def test_txt_files_are_one_document_each_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "sub" / f"{i}.txt").write_text(text)
    docs, counter = read_source([str(tmp_path / "**" / "*.txt")])
    assert [doc.text for doc in docs] == TEXTS
    assert [doc.doc_id for doc in docs] == ["0.txt", "1.txt", "2.txt"]
    assert counter.counts == {"documents_read": 3}


def test_zstd_with_several_frames_reads_every_frame(tmp_path: Path) -> None:
    compressor = zstandard.ZstdCompressor()
    frames = [compressor.compress(jsonl_bytes([text])) for text in TEXTS]
    (tmp_path / "a.jsonl.zst").write_bytes(b"".join(frames))
    docs, counter = read_source([str(tmp_path / "a.jsonl.zst")])
    assert [doc.text for doc in docs] == TEXTS
    assert counter.skipped == 0


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [
        b'{"body": "good one"}',
        b'{"body": "not closed',
        b'["a", "list"]',
        b'{"title": "no body"}',
        b'{"body": 42}',
        b'{"body": "bad \xff\xfe bytes"}',
        b'{"body": "lone \\ud800 surrogate"}',
        b'{"body": "   \\n "}',
        b"",  # a blank line is not a document
        json.dumps({"body": "x" * 500}).encode(),
        b'{"body": "good two"}',
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    docs, counter = read_source([str(tmp_path / "bad.jsonl")], max_doc_bytes=100)
    assert [doc.text for doc in docs] == ["good one", "good two"]
    expected = {"malformed_json": 2, "missing_field": 2, "not_utf8": 2, "empty": 1}
    assert counter.counts == {**expected, "too_large": 1, "documents_read": 2}
    assert counter.per_file == {str(tmp_path / "bad.jsonl"): counter.counts}
    assert counter.skipped == 8


def test_bad_txt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("good")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 in latin-1")
    (tmp_path / "c.txt").write_text(" \n\t")
    (tmp_path / "d.txt").write_text("y" * 101)
    (tmp_path / "e.txt").write_text("also good")
    docs, counter = read_source([str(tmp_path / "*.txt")], max_doc_bytes=100)
    assert [doc.text for doc in docs] == ["good", "also good"]
    assert counter.counts == {"documents_read": 2, "not_utf8": 1, "empty": 1, "too_large": 1}
    assert counter.per_file[str(tmp_path / "b.txt")] == {"not_utf8": 1}


def test_oversized_line_is_skipped_without_losing_the_next(tmp_path: Path) -> None:
    big = json.dumps({"body": "z" * 5000}).encode()
    (tmp_path / "a.jsonl").write_bytes(b'{"body": "a"}\n' + big + b'\n{"body": "b"}\n')
    docs, counter = read_source([str(tmp_path / "a.jsonl")], max_doc_bytes=64)
    assert [doc.text for doc in docs] == ["a", "b"]
    assert [doc.doc_id for doc in docs] == ["a.jsonl:0", f"a.jsonl:{14 + len(big) + 1}"]
    assert counter.counts == {"documents_read": 2, "too_large": 1}


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_truncated_archive_keeps_the_documents_before_the_cut(tmp_path: Path, suffix: str) -> None:
    # Hex digits barely compress, so the archive spans several zstd blocks and the cut keeps some.
    texts = [f"document {i} " + hashlib.sha512(str(i).encode()).hexdigest() for i in range(3000)]
    data = jsonl_bytes(texts)
    compress = gzip.compress if suffix == "gz" else zstandard.ZstdCompressor().compress
    whole = compress(data)
    (tmp_path / f"cut.jsonl.{suffix}").write_bytes(whole[: len(whole) - 200])
    (tmp_path / "next.jsonl").write_bytes(jsonl_bytes(["after"]))
    docs, counter = read_source(
        [str(tmp_path / f"cut.jsonl.{suffix}"), str(tmp_path / "next.jsonl")]
    )
    read_texts = [doc.text for doc in docs]
    assert read_texts[-1] == "after"
    kept = read_texts[:-1]
    assert 0 < len(kept) < len(texts)
    assert kept == texts[: len(kept)]  # a prefix, in order, no half document
    assert counter.counts == {"documents_read": len(kept) + 1, "truncated": 1}


def test_corrupt_gzip_is_counted_as_truncated(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl.gz").write_bytes(b"this is not gzip at all")
    docs, counter = read_source([str(tmp_path / "x.jsonl.gz")])
    assert docs == []
    assert counter.counts == {"truncated": 1}


def test_unreadable_files_are_counted_once_each(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(["before"]))
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "nowhere.jsonl")  # a broken link
    (tmp_path / "c.parquet").write_bytes(b"PAR1 but no parquet in here")
    (tmp_path / "d.txt").symlink_to(tmp_path / "nowhere.txt")
    (tmp_path / "e.jsonl").write_bytes(jsonl_bytes(["vanishes"]))
    (tmp_path / "f.jsonl").write_bytes(jsonl_bytes(["after"]))
    os.mkfifo(tmp_path / "g.jsonl")  # opening it would wait for a writer forever
    source = SourceConfig(name="src", paths=[str(tmp_path / "*")], text_field="body")
    units = plan_source(source)
    (tmp_path / "e.jsonl").unlink()  # gone between planning and reading
    counter = SkipCounter()
    docs = [doc for unit in units for doc in read_unit(unit, counter)]
    assert [doc.text for doc in docs] == ["before", "after"]
    assert counter.counts == {"documents_read": 2, "unreadable": 5}
    unreadable = {path for path, counts in counter.per_file.items() if "unreadable" in counts}
    assert unreadable == {
        str(tmp_path / name) for name in ["b.jsonl", "c.parquet", "d.txt", "e.jsonl", "g.jsonl"]
    }


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path: Path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(TEXTS))
    docs, counter = read_source([str(tmp_path / "bom.jsonl")])
    assert [doc.text for doc in docs] == TEXTS and counter.skipped == 0


def test_parquet_categorical_text_is_text(tmp_path: Path) -> None:
    """A pandas categorical column is dictionary-encoded in parquet: it holds strings too (it
    counted every row as missing_field)."""
    table = pa.table({"body": pa.array(TEXTS * 2).dictionary_encode()})
    pq.write_table(table, tmp_path / "cat.parquet")
    docs, counter = read_source([str(tmp_path / "cat.parquet")])
    assert [doc.text for doc in docs] == TEXTS * 2 and counter.skipped == 0


def test_parquet_missing_column_counts_every_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"other": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["c", None, "", "d"]}), tmp_path / "b.parquet")
    docs, counter = read_source([str(tmp_path / "*.parquet")])
    assert [doc.text for doc in docs] == ["c", "d"]
    assert [doc.doc_id for doc in docs] == ["b.parquet:0", "b.parquet:3"]
    assert counter.counts == {"documents_read": 2, "missing_field": 3, "empty": 1}


@pytest.mark.parametrize("target", [1, 7, 50, 333, 4096])
def test_byte_range_splits_read_every_line_exactly_once(tmp_path: Path, target: int) -> None:
    texts = [f"line {i} " + "w" * (i * 7 % 90) for i in range(300)]
    (tmp_path / "big.jsonl").write_bytes(jsonl_bytes(texts))
    whole, _ = read_source([str(tmp_path / "big.jsonl")], target=1 << 30)
    split, counter = read_source([str(tmp_path / "big.jsonl")], target=target)
    assert [doc.text for doc in whole] == texts
    assert split == whole  # same texts and ids, in the same order
    assert counter.counts == {"documents_read": len(texts)}


def test_units_group_small_files_and_split_big_ones(tmp_path: Path) -> None:
    for name, size in [("a.jsonl", 40), ("b.jsonl", 40), ("c.jsonl", 250), ("d.txt", 10)]:
        (tmp_path / name).write_bytes(b"x" * size)
    files = sorted(tmp_path.iterdir())
    units = plan_units("s", files, "auto", target_bytes=100)
    assert [unit.unit_id for unit in units] == [f"s-{i:06d}" for i in range(5)]
    assert [[(Path(p).name, a, b) for p, a, b in unit.pieces] for unit in units] == [
        [("a.jsonl", 0, 40), ("b.jsonl", 0, 40)],
        [("c.jsonl", 0, 100)],
        [("c.jsonl", 100, 200)],
        [("c.jsonl", 200, 250)],
        [("d.txt", 0, 10)],  # a unit never mixes formats
    ]
    assert [unit.format for unit in units] == ["jsonl"] * 4 + ["txt"]
    assert plan_units("s", files, "auto", target_bytes=100) == units


def test_parquet_splits_by_row_group(tmp_path: Path) -> None:
    table = pa.table({"body": [f"row {i} " + "v" * 200 for i in range(40)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    whole, _ = read_source([str(tmp_path / "a.parquet")], target=1 << 30)
    units = plan_units("s", [tmp_path / "a.parquet"], "auto", target_bytes=1, text_field="body")
    assert [unit.pieces[0][1:] for unit in units] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    counter = SkipCounter()
    split = [doc for unit in units for doc in read_unit(unit, counter)]
    assert [doc.text for doc in split] == [doc.text for doc in whole] == table["body"].to_pylist()
    assert [doc.doc_id for doc in split] == [f"a.parquet:{i}" for i in range(40)]


def test_stdlib_expansion() -> None:
    library = expand_paths(SourceConfig(name="lib", paths=["stdlib"], format="stdlib"))
    relative = {path.relative_to(stdlib_dir()).as_posix() for path in library}
    assert {"os.py", "json/__init__.py"} <= relative
    assert all(path.suffix == ".py" for path in library)
    assert not any(part in ("site-packages", "dist-packages") for p in library for part in p.parts)
    assert not any(r.startswith(("test/", "tests/", "idlelib/idle_test/")) for r in relative)
    assert library == sorted(library, key=lambda path: path.parts)

    tests = expand_paths(SourceConfig(name="tests", paths=["stdlib/test"], format="stdlib"))
    assert {"test/test_os.py", "test/__init__.py"} <= {
        path.relative_to(stdlib_dir()).as_posix() for path in tests
    }
    assert all(path.is_relative_to(stdlib_dir() / "test") for path in tests)


def test_stdlib_units_are_deterministic_and_read_library_code() -> None:
    source = SourceConfig(name="lib", paths=["stdlib/json"], format="stdlib")
    units = plan_source(source, target_bytes=20_000)
    assert units == plan_source(source, target_bytes=20_000)
    assert len(units) > 1
    counter = SkipCounter()
    docs = {doc.doc_id: doc.text for unit in units for doc in read_unit(unit, counter)}
    assert docs["json/__init__.py"] == (stdlib_dir() / "json" / "__init__.py").read_text()
    assert counter.counts["documents_read"] == len(docs) == len(expand_paths(source))


def test_patterns_that_match_nothing_raise_naming_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-*.jsonl")
    with pytest.raises(SourceError, match="nothing-"):
        expand_paths(SourceConfig(name="crawl", paths=[pattern]))
    with pytest.raises(SourceError, match="crawl"):
        expand_paths(SourceConfig(name="crawl", paths=[]))
    with pytest.raises(SourceError, match="stdlib/no_such_dir"):
        expand_paths(SourceConfig(name="x", paths=["stdlib/no_such_dir"], format="stdlib"))
    with pytest.raises(SourceError, match="notes.md"):
        detect_format(tmp_path / "notes.md")


def test_paths_are_sorted_unique_and_absolute(tmp_path: Path, monkeypatch) -> None:
    for name in ["b.jsonl", "a.jsonl", "c.txt"]:
        (tmp_path / name).write_text("")
    monkeypatch.chdir(tmp_path)
    source = SourceConfig(name="s", paths=["*.jsonl", "a.jsonl", str(tmp_path)])
    assert expand_paths(source) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.txt"]


def test_a_directory_follows_linked_directories_and_leaves_out_hidden_files(
    tmp_path: Path,
) -> None:
    """A linked directory inside an input directory is read (it was skipped without a word),
    once, even through a link back up; hidden files (.DS_Store) and Spark's _SUCCESS, which a
    data directory holds beside its data, are left out (an unknown extension refused the
    build)."""
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    (data / "part").mkdir(parents=True)
    elsewhere.mkdir()
    (data / "a.txt").write_text("a")
    (data / "part" / "b.txt").write_text("b")
    (elsewhere / "c.txt").write_text("c")
    (data / "linked").symlink_to(elsewhere)
    (data / "part" / "up").symlink_to(data)  # a cycle
    for junk in (".DS_Store", "_SUCCESS", ".part-0.crc"):
        (data / "part" / junk).write_text("x")
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref")
    files = expand_paths(SourceConfig(name="s", paths=[str(data)]))
    assert [p.relative_to(data).as_posix() for p in files] == ["a.txt", "linked/c.txt",
                                                                "part/b.txt"]  # fmt: skip


def test_skip_counter_merges_and_pickles() -> None:
    first, second = SkipCounter(), SkipCounter()
    first.add("a", "empty")
    first.add("a", "documents_read", 3)
    second.add("a", "empty", 2)
    second.add("b", "unreadable")
    first.merge(pickle.loads(pickle.dumps(second)))
    assert first.to_dict() == {
        "counts": {"documents_read": 3, "empty": 3, "unreadable": 1},
        "per_file": {"a": {"documents_read": 3, "empty": 3}, "b": {"unreadable": 1}},
    }
    assert first.skipped == 4
    with pytest.raises(ValueError, match="bogus"):
        first.add("a", "bogus")


def test_work_units_pickle_and_compare() -> None:
    unit = plan_units("s", [os.__file__], "stdlib", root=stdlib_dir())[0]
    assert isinstance(unit, WorkUnit)
    assert pickle.loads(pickle.dumps(unit)) == unit
    assert unit.unit_id == "s-000000"
