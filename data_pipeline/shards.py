"""The shard format: the one contract between `kiln data` (writer) and `kiln train` (reader).

Imported by both sides, so it depends on numpy and the standard library only (never Ray, never
torch); the tars are plain WebDataset tars.

Layout of an output directory:

    OUT/tokenizer.model
    OUT/shards/{source}-{split}-{index:05d}.tar
    OUT/manifest.json
    OUT/report.json

A shard is a WebDataset tar holding one source and one split. Each sample is a *block* of whole
documents, stored as two members with a shared key `{source}-{split}-{index:05d}-{block:05d}`:

    KEY.tokens.npy    1-D token ids of the block's documents, concatenated (uint16 when the
                      vocabulary fits in 16 bits, else uint32); no BOS/EOS added
    KEY.lengths.npy   1-D uint32, tokens per document; sums to len(tokens)

so the trainer can pack to any sequence length and mask attention across documents. Members
carry fixed metadata (mtime 0, uid/gid 0, mode 0444, sorted order), so the same tokens give
byte-identical tars. Plain `webdataset.WebDataset(url)` decodes both members with numpy, and
`ray.data.read_webdataset` reads them too.

`manifest.json` lists every shard (path relative to OUT, sha256, bytes, tokens, documents,
source, split, dtype), the tokenizer (path, sha256, vocab size, special-token ids), the
fingerprint of the config that produced the shards, source weights and totals per source and
split. The trainer reads the manifest, never a directory listing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "kiln-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")  # source names end up in keys: no '.', no '-'


class ShardFormatError(ValueError):
    """A shard or manifest that does not follow this format; the message names the file."""


class NoManifestError(ShardFormatError):
    """A directory with no manifest.json and no build under way in it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(source: str, split: str, index: int) -> str:
    if not NAME_PATTERN.match(source):
        raise ShardFormatError(f"source name {source!r} must match {NAME_PATTERN.pattern}")
    if split not in SPLITS:
        raise ShardFormatError(f"split {split!r} is not one of {SPLITS}")
    return f"{source}-{split}-{index:05d}"


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest lists it."""

    path: str  # relative to the output directory
    sha256: str
    bytes: int
    tokens: int
    documents: int
    source: str
    split: str
    dtype: str


@dataclass(frozen=True)
class TokenizerRecord:
    path: str  # relative to the output directory when inside it
    sha256: str
    vocab_size: int
    model_type: str
    special_ids: dict[str, int]
    sentinel_ids: list[int]


@dataclass
class Manifest:
    """The index of an output directory."""

    fingerprint: str  # hash of the config that produced the shards
    tokenizer: TokenizerRecord
    shards: list[ShardRecord]
    weights: dict[str, float]  # mixture weight per source
    config: dict[str, Any] = field(default_factory=dict)  # the producing config, for humans
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def totals(self) -> dict[str, dict[str, dict[str, int]]]:
        """{source: {split: {"tokens", "documents", "shards"}}}."""
        totals: dict[str, dict[str, dict[str, int]]] = {}
        for shard in self.shards:
            entry = totals.setdefault(shard.source, {}).setdefault(
                shard.split, {"tokens": 0, "documents": 0, "shards": 0}
            )
            entry["tokens"] += shard.tokens
            entry["documents"] += shard.documents
            entry["shards"] += 1
        return totals

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["totals"] = self.totals()
        return data


def encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # a damaged header: ValueError, SyntaxError, TokenError, ...
        raise ShardFormatError(f"{name}: not a numpy array ({error})") from error


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process, to write before renaming.

    Per process, because a worker of a killed run may still be finishing the same file while
    the rerun writes it: each writes its own temporary file and the renames are atomic.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temporary name, fsync, rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


class _HashingWriter:
    """A write-only file that also feeds a sha256 and counts bytes (for streamed tars)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(payload))


def write_shard(
    out_dir: Path,
    source: str,
    split: str,
    index: int,
    blocks: Iterable[list[np.ndarray]],
    vocab_size: int,
) -> ShardRecord:
    """Write one shard atomically and describe it, streaming: one block in memory at a time.

    The tar is what `webdataset.TarWriter(..., mtime=0, mode=0o444, user="", group="")` writes
    (tarfile's default format, members of a sample in sorted order), produced with `tarfile` directly because
    importing webdataset imports torch: a second and a quarter GiB per worker to write a tar.

    Args:
        out_dir: the output directory (the shard goes to `out_dir/shards/`).
        source, split, index: name the shard.
        blocks: each block is a list of per-document token-id arrays (may be a generator).
        vocab_size: decides the stored dtype.
    """
    dtype = token_dtype(vocab_size)
    name = shard_name(source, split, index)
    relative = f"shards/{name}.tar"
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    tokens = documents = 0
    with open(tmp, "wb") as handle:
        writer = _HashingWriter(handle)
        with tarfile.open(fileobj=writer, mode="w|") as archive:
            for number, block in enumerate(blocks):
                if not block:
                    continue
                lengths = np.array([len(doc) for doc in block], dtype=np.uint32)
                ids = np.concatenate(block)
                if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
                    bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
                    handle.close()
                    tmp.unlink()
                    raise ShardFormatError(
                        f"{name}: token id {bad} outside vocab size {vocab_size}"
                    )
                ids = ids.astype(dtype, copy=False)  # checked first: a cast would wrap
                key = f"{name}-{number:05d}"
                _add_member(archive, f"{key}.lengths.npy", encode_array(lengths))
                _add_member(archive, f"{key}.tokens.npy", encode_array(ids))
                tokens += int(ids.size)
                documents += len(block)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return ShardRecord(
        path=relative,
        sha256=writer.digest.hexdigest(),
        bytes=writer.size,
        tokens=tokens,
        documents=documents,
        source=source,
        split=split,
        dtype=dtype.name,
    )


def iter_blocks(path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, tokens, lengths) for each block of a shard, in order, checking its structure."""
    try:
        archive = tarfile.open(path, "r")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as error:
        raise ShardFormatError(f"{path}: unreadable shard ({error})") from error
    with archive:
        members: dict[str, dict[str, bytes]] = {}
        order: list[str] = []
        try:
            for member in archive:
                key, _, suffix = member.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                handle = archive.extractfile(member)
                members[key][suffix] = handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ShardFormatError(f"{path}: truncated or corrupt shard ({error})") from error
    for key in order:
        parts = members[key]
        if set(parts) != {"tokens.npy", "lengths.npy"}:
            raise ShardFormatError(f"{path}: sample {key} has members {sorted(parts)}")
        tokens = decode_array(parts["tokens.npy"], f"{path}:{key}.tokens.npy")
        lengths = decode_array(parts["lengths.npy"], f"{path}:{key}.lengths.npy")
        if int(lengths.sum()) != tokens.size:
            raise ShardFormatError(f"{path}: sample {key} lengths do not add up to its tokens")
        yield key, tokens, lengths


def iter_documents(path: Path) -> Iterator[np.ndarray]:
    """Each document's token ids, in shard order."""
    for _, tokens, lengths in iter_blocks(path):
        yield from np.split(tokens, np.cumsum(lengths)[:-1]) if lengths.size else ()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MANIFEST_NAME = "manifest.json"


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = out_dir / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def find_output_dir(path: Path) -> Path | None:
    """The output directory that an existing `path` inside one lies in (its manifest.json, its
    shards/ directory, a shard, the tokenizer), or None."""
    if not path.exists():
        return None
    return next((p for p in list(path.parents)[:2] if (p / MANIFEST_NAME).is_file()), None)


def read_manifest(out_dir: Path) -> Manifest:
    """Load `out_dir/manifest.json`, checking its format and version."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        if (Path(out_dir) / ".work").is_dir():  # data_pipeline.pipeline.WORK_DIR
            raise ShardFormatError(
                f"{path}: no manifest yet: the `kiln data` build in {out_dir} has not finished "
                "(running now, or stopped: rerun its command to resume it)"
            )
        raise NoManifestError(f"{path}: no manifest (run `kiln data output_dir={out_dir}` first)")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ShardFormatError(f"{path}: a JSON {type(data).__name__}, not a manifest object")
    if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    try:
        return Manifest(
            fingerprint=data["fingerprint"],
            tokenizer=TokenizerRecord(**data["tokenizer"]),
            shards=[ShardRecord(**shard) for shard in data["shards"]],
            weights=data["weights"],
            config=data.get("config", {}),
        )
    except (KeyError, TypeError) as error:
        raise ShardFormatError(f"{path}: malformed manifest ({error})") from error


def verify_shard(out_dir: Path, record: ShardRecord) -> None:
    """Raise ShardFormatError unless the shard on disk has the manifest's sha256."""
    path = Path(out_dir) / record.path
    if not path.is_file():
        raise ShardFormatError(f"{path}: listed in the manifest but missing")
    actual = sha256_file(path)
    if actual != record.sha256:
        raise ShardFormatError(
            f"{path}: sha256 {actual[:12]}... != manifest {record.sha256[:12]}..."
        )
