"""Read raw corpora: expand a source's paths, split them into work units, read documents.

Plain Python (no Ray), so Ray tasks call it and tests run it directly. The flow is
`expand_paths` -> `plan_units` -> `read_unit` per unit. Units depend only on the file list,
file sizes (parquet: row-group sizes) and `target_bytes`, never on the number of workers: that
is what keeps the pipeline's output independent of the cluster's size. Bad input never raises;
each skipped document is counted by reason in a `SkipCounter`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pretrain.config imports Hydra, which Ray workers need not load
    from pretrain.config import SourceConfig

SKIP_REASONS = (
    "malformed_json",  # a jsonl line that is not JSON, or not a JSON object
    "missing_field",  # the text field is absent, null or not a string
    "not_utf8",  # bytes that are not UTF-8 (one per jsonl line, one per txt file)
    "empty",  # empty or whitespace-only text
    "too_large",  # a document over max_doc_bytes
    "truncated",  # a cut-off or corrupt .gz/.zst; the documents before the damage are kept
    "unreadable",  # missing, permission denied, not a regular file, a corrupt parquet: one per piece
)
DOCUMENTS_READ = "documents_read"
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "stdlib")
WHOLE_FILE_FORMATS = ("txt", "stdlib")  # one file is one document
DEFAULT_TARGET_BYTES = 64 << 20
DEFAULT_MAX_DOC_BYTES = 10 << 20

_SUFFIX_FORMATS = {f"{e}{c}": f"jsonl{c}" for e in (".jsonl", ".json") for c in ("", ".gz", ".zst")}
_SUFFIX_FORMATS |= {".parquet": "parquet", ".txt": "txt"}
# Parts of the standard library that are not library code (see `expand_paths`).
_STDLIB_NEVER = ("site-packages", "dist-packages")
_STDLIB_TESTS = (("test",), ("tests",), ("idlelib", "idle_test"))


class SourceError(ValueError):
    """A source is misconfigured: no paths, a pattern matching nothing, an unknown format."""


@dataclass(frozen=True)
class Document:
    """One document; `doc_id` is unique in its source and independent of the data's location."""

    source: str
    doc_id: str
    text: str


class Piece(NamedTuple):
    """Part of a file: a byte range for jsonl, a row-group range for parquet, else the whole
    file as `(0, size)`."""

    path: str
    start: int
    end: int


@dataclass(frozen=True)
class WorkUnit:
    """A deterministic slice of a source: consecutive pieces of files of one format."""

    source: str
    index: int
    pieces: tuple[Piece, ...]
    format: str
    text_field: str = "text"
    root: str = "/"  # doc ids are file paths relative to this directory

    @property
    def unit_id(self) -> str:
        return f"{self.source}-{self.index:06d}"


@dataclass
class SkipCounter:
    """Documents skipped by reason, and `documents_read`, in total and per file.

    Picklable and mergeable: each Ray worker keeps its own and the driver sums them.
    """

    counts: dict[str, int] = field(default_factory=dict)
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, path: str, reason: str, n: int = 1) -> None:
        """Counts `n` documents of `path` under a SKIP_REASONS entry or DOCUMENTS_READ."""
        if reason not in SKIP_REASONS and reason != DOCUMENTS_READ:
            raise ValueError(f"unknown skip reason {reason!r}")
        if n > 0:
            self.counts[reason] = self.counts.get(reason, 0) + n
            file_counts = self.per_file.setdefault(path, {})
            file_counts[reason] = file_counts.get(reason, 0) + n

    def merge(self, other: SkipCounter) -> None:
        """Adds `other`'s counts into this counter."""
        for path, file_counts in other.per_file.items():
            for reason, n in file_counts.items():
                self.add(path, reason, n)

    @property
    def skipped(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason in SKIP_REASONS)

    def to_dict(self) -> dict[str, object]:
        """Plain, key-sorted dicts for report.json."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "per_file": {p: dict(sorted(c.items())) for p, c in sorted(self.per_file.items())},
        }


# -- paths and formats -----------------------------------------------------------------


def expand_paths(source: SourceConfig) -> list[Path]:
    """Expands a source's files, globs and directories into sorted, unique absolute paths.

    With `format: stdlib` the paths are `stdlib` (every `.py` file of the running interpreter's
    standard library but `site-packages`, `dist-packages` and the `test`, `tests` and
    `idlelib/idle_test` packages) or `stdlib/<subdir>` (every `.py` file under it).

    Raises:
        SourceError: the source has no paths, or one of them matches nothing.
    """
    if not source.paths:
        raise SourceError(f"source {source.name!r} lists no paths")
    found: set[Path] = set()
    for pattern in source.paths:
        if source.format == "stdlib":
            matches = _expand_stdlib(source.name, pattern)
        else:
            matches = _expand_glob(pattern)
        if not matches:
            raise SourceError(f"source {source.name!r}: path {pattern!r} matches no files")
        found.update(matches)
    return sorted(found, key=lambda path: path.parts)


def _is_text_type(pa: Any, field_type: Any) -> bool:
    """Whether a parquet column of `field_type` holds text kiln reads (strings or bytes)."""
    if field_type is None:
        return False
    kinds = ("is_string", "is_large_string", "is_binary", "is_large_binary", "is_string_view",
             "is_binary_view")  # fmt: skip
    return any(getattr(pa.types, kind, lambda _: False)(field_type) for kind in kinds)


def _expand_glob(pattern: str) -> list[Path]:
    matches = []
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
        if os.path.isdir(match):  # a directory stands for every file under it
            matches += _files_under(Path(match))
        else:  # files, and broken links that the reader will count as unreadable
            matches.append(Path(match))
    # Absolute but not resolved: Ray workers may have another cwd; a link should stay a link.
    return [Path(os.path.abspath(path)) for path in matches]


def _files_under(top: Path) -> list[Path]:
    """Every file under a directory given as input, in a stable order: linked directories
    followed (each real directory once: no cycles), hidden files and directories (`.DS_Store`,
    `.git`, checksum files such as Spark's `.part-0.crc`) and Spark's `_SUCCESS` markers left
    out, as a directory of data is expected to hold them beside the data."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, names in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or a second link to one directory
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath, name) for name in sorted(names)
                  if not name.startswith(".") and name != "_SUCCESS"]  # fmt: skip
    return files


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _expand_stdlib(source_name: str, pattern: str) -> list[Path]:
    parts = PurePosixPath(pattern).parts
    if not parts or parts[0] != "stdlib":
        raise SourceError(
            f"source {source_name!r}: format stdlib takes 'stdlib' or 'stdlib/<subdir>', "
            f"not {pattern!r}"
        )
    root = stdlib_dir()
    top = root.joinpath(*parts[1:])
    if top.is_file():
        return [top]
    files = []
    for dirpath, dirnames, filenames in os.walk(top):
        relative = Path(dirpath).relative_to(root).parts
        dirnames[:] = [
            name
            for name in dirnames
            if name not in _STDLIB_NEVER
            and not (len(parts) == 1 and (*relative, name) in _STDLIB_TESTS)
        ]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return files


def detect_format(path: str | Path, declared: str = "auto") -> str:
    """A file's format: `declared` unless it is `auto`, else told by the file's extension.

    Raises:
        SourceError: an unknown declared format or, under `auto`, an unknown extension.
    """
    if declared != "auto":
        if declared not in FORMATS:
            raise SourceError(f"unknown format {declared!r}; expected auto or one of {FORMATS}")
        return declared
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if str(path).lower().endswith(suffix):
            return fmt
    known = ", ".join(_SUFFIX_FORMATS)
    raise SourceError(f"cannot tell the format of {str(path)!r} (known extensions: {known})")


# -- work units ------------------------------------------------------------------------


def plan_source(source: SourceConfig, target_bytes: int = DEFAULT_TARGET_BYTES) -> list[WorkUnit]:
    """Expands a source's paths and plans its work units (see `plan_units`)."""
    root = stdlib_dir() if source.format == "stdlib" else None
    files = expand_paths(source)
    return plan_units(source.name, files, source.format, target_bytes, source.text_field, root)


def plan_units(
    source_name: str,
    files: Sequence[str | Path],
    fmt: str,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    text_field: str = "text",
    root: str | Path | None = None,
) -> list[WorkUnit]:
    """Groups files, or splits them, into units of about `target_bytes` each.

    Small files are grouped in order; an uncompressed jsonl file over `target_bytes` is split
    into byte ranges, a parquet file into runs of row groups; compressed files are never split.
    A unit holds one format and outgrows `target_bytes` only when a single piece does.

    Args:
        source_name: the prefix of every unit id.
        files: the source's files in order (from `expand_paths`).
        fmt: the source's declared format; `auto` tells it per file by extension.
        target_bytes: the size that closes a unit (file bytes; parquet: row-group bytes).
        text_field: the jsonl key or parquet column holding the text.
        root: doc ids are paths relative to it; by default the files' common directory.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    paths = [str(path) for path in files]
    if root is None:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else "/"
    groups: list[tuple[str, list[Piece]]] = []  # (format, pieces) of each unit
    unit_bytes = 0
    for path in paths:
        file_format = detect_format(path, fmt)
        for piece, weight in _split_file(path, file_format, target_bytes):
            if not groups or groups[-1][0] != file_format or unit_bytes + weight > target_bytes:
                groups.append((file_format, []))
                unit_bytes = 0
            pieces = groups[-1][1]
            if pieces and pieces[-1].path == path and pieces[-1].end == piece.start:
                pieces[-1] = Piece(path, pieces[-1].start, piece.end)  # consecutive row groups
            else:
                pieces.append(piece)
            unit_bytes += weight
    return [
        WorkUnit(source_name, index, tuple(pieces), unit_format, text_field, str(root))
        for index, (unit_format, pieces) in enumerate(groups)
    ]


def _split_file(path: str, fmt: str, target_bytes: int) -> list[tuple[Piece, int]]:
    """A file's pieces with their weights in bytes; a file that cannot be read is one piece."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0
    if fmt == "jsonl" and size > target_bytes:
        starts = range(0, size, target_bytes)
        return [(Piece(path, s, min(s + target_bytes, size)), target_bytes) for s in starts]
    if fmt == "parquet":
        import pyarrow as pa  # here, not at the top: only parquet sources pay for pyarrow
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(path).metadata
            groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
            return [
                (Piece(path, g, g + 1), group.total_byte_size) for g, group in enumerate(groups)
            ]
        except (OSError, pa.ArrowException):
            return [(Piece(path, 0, 1), size)]
    return [(Piece(path, 0, size), size)]


# -- reading ---------------------------------------------------------------------------


def read_unit(
    unit: WorkUnit, counter: SkipCounter, max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES
) -> Iterator[Document]:
    """Yields the unit's good documents in order and counts the others in `counter`.

    Doc ids: `<path>` for whole files, `<path>:<byte offset of the line>` for jsonl (of the
    decompressed stream), `<path>:<row>` for parquet, with paths relative to `unit.root`.
    Counts are added as the iterator advances, so they are complete once it is exhausted.
    """
    for piece in unit.pieces:
        # only regular files (or links to them) are read: opening a FIFO or a device would
        # block the worker for good; those, and what vanished since planning, are unreadable
        if not os.path.isfile(piece.path):
            counter.add(piece.path, "unreadable")
            continue
        relative = Path(os.path.relpath(piece.path, unit.root)).as_posix()
        if unit.format in WHOLE_FILE_FORMATS:
            read = _read_whole_file
        else:
            read = _read_parquet if unit.format == "parquet" else _read_jsonl
        yield from read(piece, unit, relative, counter, max_doc_bytes)


def _read_whole_file(
    piece: Piece, unit: WorkUnit, relative: str, counter: SkipCounter, max_doc_bytes: int
) -> Iterator[Document]:
    try:
        with open(piece.path, "rb") as file:
            data = file.read(max_doc_bytes + 1)  # the one byte more tells "too large"
    except OSError:
        counter.add(piece.path, "unreadable")
        return
    text, reason = _check_text(data, max_doc_bytes)
    counter.add(piece.path, reason or DOCUMENTS_READ)
    if reason is None:
        yield Document(unit.source, relative, text)


def _check_text(data: bytes | None, max_doc_bytes: int) -> tuple[str, str | None]:
    """(text, None) for a good document's bytes, ("", reason) for bad ones."""
    if data is None:
        return "", "missing_field"
    if len(data) > max_doc_bytes:
        return "", "too_large"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "", "not_utf8"
    return (text, None) if text and not text.isspace() else ("", "empty")


def _read_jsonl(
    piece: Piece, unit: WorkUnit, relative: str, counter: SkipCounter, max_doc_bytes: int
) -> Iterator[Document]:
    try:
        raw = open(piece.path, "rb")  # noqa: SIM115 - closed by the `with` below
    except OSError:
        counter.add(piece.path, "unreadable")
        return
    with raw:
        try:
            if unit.format == "jsonl":
                lines = _iter_lines(raw, piece.start, piece.end, max_doc_bytes)
            else:
                if unit.format == "jsonl.gz":
                    stream: IO[bytes] = gzip.GzipFile(fileobj=raw)
                else:
                    stream = io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
                lines = _iter_lines(stream, 0, None, max_doc_bytes)
            for offset, line in lines:
                text, reason = _parse_line(line, unit.text_field)
                if reason != "blank":
                    counter.add(piece.path, reason or DOCUMENTS_READ)
                if reason is None:
                    yield Document(unit.source, f"{relative}:{offset}", text)
        except (EOFError, OSError, zlib.error):
            # Keep the documents before the damage, note the file, go on with the next piece.
            counter.add(piece.path, "unreadable" if unit.format == "jsonl" else "truncated")


def _parse_line(line: bytes | None, text_field: str) -> tuple[str, str | None]:
    """(text, None) for a good jsonl line, ("", reason) for a bad or blank one."""
    if line is None:
        return "", "too_large"
    if not line.strip():
        return "", "blank"  # blank lines separate nothing in jsonl; they are not documents
    try:
        # utf-8-sig: a byte-order mark (some editors' and exporters' first bytes) is not text
        record = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return "", "not_utf8"
    except (ValueError, RecursionError):
        return "", "malformed_json"
    if not isinstance(record, dict):
        return "", "malformed_json"
    text = record.get(text_field)
    if not isinstance(text, str):
        return "", "missing_field"
    if not text or text.isspace():
        return "", "empty"
    if b"\\u" in line:  # JSON escapes can smuggle in lone surrogates, which no encoder takes
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "", "not_utf8"
    return text, None


def _iter_lines(
    stream: IO[bytes], start: int, end: int | None, max_line_bytes: int
) -> Iterator[tuple[int, bytes | None]]:
    """Yields `(offset, line)` for each line that begins in `[start, end)`; the line is None
    when over `max_line_bytes`, and such a line is never held in memory whole.

    A range that starts mid-line leaves that line to the range before it: the standard split
    rule, under which every line of a file belongs to exactly one range.
    """
    position = start
    if start > 0:
        stream.seek(start - 1)  # if byte start-1 ends a line, the line at `start` is ours
        position = start - 1 + _read_line(stream, 0)[0]
    while end is None or position < end:
        consumed, line = _read_line(stream, max_line_bytes)
        if consumed == 0:
            return
        yield position, line
        position += consumed


def _read_line(stream: IO[bytes], limit: int) -> tuple[int, bytes | None]:
    """Reads one line: (bytes consumed, the line without its newline or None if over `limit`)."""
    line = stream.readline(limit + 2)  # the newline, and one byte more that tells "too long"
    consumed = len(line)
    if line.endswith(b"\n"):
        line = line[:-1].removesuffix(b"\r")
    elif consumed == limit + 2:  # over the limit: drain the rest in bounded chunks
        while chunk := stream.readline(1 << 20):
            consumed += len(chunk)
            if chunk.endswith(b"\n"):
                break
    return consumed, (line if len(line) <= limit else None)


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst stream of one or more frames.

    zstandard's own `stream_reader` ends quietly when its input is cut inside a frame; this
    raises EOFError there, as `gzip` does, so truncation is counted rather than missed.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard  # here, not at the top: only .zst sources need it

        self._raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame, self._pending = False, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._raw.read(1 << 16)
            if not chunk and self._in_frame:
                raise EOFError("zstd stream ended inside a frame")
            if not chunk:
                return 0
            self._pending = memoryview(self._decompress(chunk))
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            try:
                out.append(self._frame.decompress(chunk))
            except self._zstd.ZstdError as error:
                raise EOFError(f"corrupt zstd data: {error}") from error
            if not self._frame.eof:
                break
            chunk, self._in_frame = self._frame.unused_data, False  # the next frame starts here
            self._frame = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(out)


def _read_parquet(
    piece: Piece, unit: WorkUnit, relative: str, counter: SkipCounter, max_doc_bytes: int
) -> Iterator[Document]:
    import pyarrow as pa  # here, not at the top: only parquet sources pay for pyarrow
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(piece.path)
        groups = range(piece.start, min(piece.end, file.metadata.num_row_groups))
        row = sum(file.metadata.row_group(g).num_rows for g in range(piece.start))
        field_type = None
        if unit.text_field in file.schema_arrow.names:
            field_type = file.schema_arrow.field(unit.text_field).type
        if field_type is not None and pa.types.is_dictionary(field_type):  # pandas categorical
            field_type = field_type.value_type
        if not _is_text_type(pa, field_type):
            n_rows = sum(file.metadata.row_group(g).num_rows for g in groups)
            counter.add(piece.path, "missing_field", n_rows)
            return
        for group in groups:
            column = file.read_row_group(group, columns=[unit.text_field]).column(0)
            # As bytes, so each value's size is checked before it is decoded.
            for value in column.cast(pa.large_binary()).to_pylist():
                text, reason = _check_text(value, max_doc_bytes)
                counter.add(piece.path, reason or DOCUMENTS_READ)
                if reason is None:
                    yield Document(unit.source, f"{relative}:{row}", text)
                row += 1
    except (OSError, pa.ArrowException):
        counter.add(piece.path, "unreadable")
