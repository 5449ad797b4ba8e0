"""Shards from an object store or web server: `data.path` as a URL or a `pipe:` command.

`kiln data` writes a directory (manifest.json, the tokenizer, shards/...). Copied as it is to
a bucket or a web server, it trains from there: `data.path=https://host/corpus/` (any scheme
webdataset's `gopen` opens: http(s), gs, ais, sftp, ...) or
`data.path='pipe:aws s3 cp s3://bucket/corpus/{path} -'`, where `{path}` is replaced by each
file's path relative to the directory. Files are fetched once into a local cache
(`data.cache_dir`, or $KILN_CACHE_DIR, or ~/.cache/kiln/data), one directory per `data.path`,
and read from there with memory maps like a local directory: random access by sample index
(exact resume, any world size) needs seekable files, which a stream is not.

Every fetched file is checked against the manifest's sha256 and size before it is renamed
into place, so a partial or corrupt download is never read; a cached file is trusted when its
size and a `.sha256` note written after that check both match the manifest. The ranks of a
node share the cache: one fetches under a file lock while the others wait, then find it full.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_pipeline.shards import MANIFEST_NAME, ShardFormatError, read_manifest

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A remote file could not be fetched or did not match the manifest."""


def is_remote(path: str) -> bool:
    """A URL with a scheme (other than file://) or a `pipe:` command."""
    return path.startswith("pipe:") or (
        bool(_SCHEME.match(path)) and not path.startswith("file://")
    )


def local_path(path: str) -> Path:
    """A local `data.path` (a plain path or a file:// URL) as a Path."""
    return Path(path[len("file://") :]) if path.startswith("file://") else Path(path)


def file_url(base: str, relative: str) -> str:
    """The URL (or pipe command) of `relative` under the remote directory `base`."""
    if base.startswith("pipe:"):
        if "{path}" not in base:
            raise FetchError(
                f"data.path={base!r}: a pipe: command needs a {{path}} placeholder for the "
                "file's path relative to the data directory"
            )
        return base.replace("{path}", relative)
    return base.rstrip("/") + "/" + relative


def default_cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln" / "data"
    return Path(root)


def cache_directory(path: str, cache_dir: str | None) -> Path:
    """The local directory that mirrors remote `path` (one per distinct path)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / hashlib.sha256(path.encode()).hexdigest()[:16]


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def fetch(url: str, target: Path, sha256: str | None = None, size: int | None = None) -> None:
    """Stream `url` to `target` through a temporary file; check size and sha256 (when given)
    before the rename, so `target` is either absent or complete and correct."""
    from webdataset.gopen import gopen  # imports torch: only when a remote path is used

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest, written = hashlib.sha256(), 0
    try:
        try:
            with gopen(url, "rb") as stream, open(temporary, "wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
        except (OSError, ValueError) as error:
            raise FetchError(f"{url}: fetch failed: {error}") from error
        if size is not None and written != size:
            raise FetchError(f"{url}: got {written} bytes, the manifest says {size}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise FetchError(
                f"{url}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                f"{sha256[:12]}..."
            )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    if sha256 is not None:
        _note(target).write_text(sha256)


def _note(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _cached(target: Path, sha256: str, size: int | None = None) -> bool:
    note = _note(target)
    return (
        target.is_file()
        and (size is None or target.stat().st_size == size)
        and note.is_file()
        and note.read_text().strip() == sha256
    )


def mirror(path: str, cache_dir: str | None = None, on_bad_shard: str = "error") -> Path:
    """The local directory holding remote `path`'s manifest, tokenizer and shards.

    The manifest is fetched on every call (it is small, and a rebuilt corpus must not be read
    through a stale one), and the copy cached before is read when that fails (a server gone
    since the run started); the tokenizer and shards only when the cache lacks them or they
    changed. With `on_bad_shard="skip"` a shard that cannot be fetched is left out (logged
    here; the loader then counts it as missing and skips it); otherwise the error names it.
    """
    directory = cache_directory(path, cache_dir)
    with _locked(directory):
        try:
            fetch(file_url(path, MANIFEST_NAME), directory / MANIFEST_NAME)
        except FetchError as error:
            # the server gone mid-run (each evaluation builds its loader anew): a manifest
            # fetched before holds, and its files are cached; a first fetch has none
            if not (directory / MANIFEST_NAME).is_file():
                raise FetchError(f"data.path={path}: no readable manifest: {error}") from error
            log.warning("data.path=%s: the manifest cannot be fetched now (%s); reading the "
                        "copy cached in %s", path, error, directory)  # fmt: skip
        try:
            manifest = read_manifest(directory)
        except ShardFormatError as error:
            raise FetchError(f"data.path={path}: no readable manifest: {error}") from error
        tokenizer = manifest.tokenizer
        fetched = 0
        if not _cached(directory / tokenizer.path, tokenizer.sha256):
            fetch(file_url(path, tokenizer.path), directory / tokenizer.path, tokenizer.sha256)
            fetched += 1
        for record in manifest.shards:
            target = directory / record.path
            if _cached(target, record.sha256, record.bytes):
                continue
            try:
                fetch(file_url(path, record.path), target, record.sha256, record.bytes)
                fetched += 1
            except FetchError as error:
                if on_bad_shard != "skip":
                    raise
                log.warning("skipping shard %s: %s", record.path, error)
    log.info("data.path=%s: %d file(s) fetched into %s", path, fetched, directory)
    return directory
