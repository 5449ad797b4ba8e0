"""Shards from an object store or web server: `data.path` as a URL or a `pipe:` command.

`kiln data` writes a directory (manifest.json, the tokenizer, shards/...). Copied as it is to
a bucket or a web server, it trains from there: `data.path=https://host/corpus/` (http(s),
ftps, sftp and scp with curl; the other schemes webdataset's `gopen` opens, such as gs or ais,
with its commands) or `data.path='pipe:aws s3 cp s3://bucket/corpus/{path} -'`, where `{path}`
is replaced by each file's path relative to the directory. Files are fetched once into a local
cache (`data.cache_dir`, or $KILN_CACHE_DIR, or ~/.cache/kiln/data), one directory per
`data.path`, and read from there with memory maps like a local directory: random access by
sample index (exact resume, any world size) needs seekable files, which a stream is not.

Every fetched file is checked against the manifest's sha256 and size before it is renamed
into place, so a partial or corrupt download is never read; a cached file is trusted when its
size and a `.sha256` note written after that check both match the manifest. The ranks of a
node share the cache: one fetches under a file lock while the others wait, then find it full
(or find the failure it met, and do not wait out the same timeouts again). A failure is one
line: the file's URL, the cause in a few words and what it likely means (`FetchError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from data_pipeline.shards import MANIFEST_NAME, ShardFormatError, read_manifest, sha256_file
from pretrain.data.notices import first_time, is_rank_zero

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
CHUNK = 1 << 20
# curl's patience (module attributes: tests shorten them)
CONNECT_TIMEOUT_S = 30  # no connection within this long: "timed out"
STALL_S = 60  # a transfer under 1 KiB/s for this long: "timed out"
# tries again after the failures curl counts as transient (host not found, timeouts, HTTP
# 408/429/500/502/503/504), 1, 2, 4 and 8 s later; not after a refused connection or a 404
RETRIES = 4
_CURL_SCHEMES = ("http", "https", "ftps", "sftp", "scp")  # those webdataset's gopen curls too
_INCOMING = ".incoming"  # a fetched manifest is read here before it replaces the cached copy
# this process's manifest (sha256) per cache directory: the build the run started with
_started_with: dict[Path, str] = {}


class FetchError(RuntimeError):
    """A remote file could not be fetched or did not match the manifest.

    Its message is one line: `where` (the file's URL or pipe command), `cause` in a few words
    ("HTTP 404", "checksum mismatch", "connection refused") and `detail`, what that likely
    means. `kind` is whose fault it is: "file" (missing on the server, other bytes than the
    manifest's), which `data.on_bad_shard=skip` may leave out; "server" (unreachable, failing),
    which would leave out every file not cached yet, and on some nodes but not others; "local"
    (the cache disk full or not writable).
    """

    def __init__(self, where: str, cause: str, detail: str = "", kind: str = "server") -> None:
        self.where, self.cause, self.detail, self.kind = where, cause, detail, kind
        super().__init__(f"{where}: {self.reason}")

    @property
    def reason(self) -> str:
        """The cause and what it means, without where."""
        return f"{self.cause} ({self.detail})" if self.detail else self.cause

    def explained(self, detail: str) -> FetchError:
        """The same failure with another detail."""
        return FetchError(self.where, self.cause, detail, self.kind)

    def advised(self, advice: str) -> FetchError:
        """The same failure, its message ending with what to do."""
        error = FetchError(self.where, self.cause, self.detail, self.kind)
        error.args = (f"{error}; {advice}",)
        return error


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
                f"data.path={base!r}",
                "a pipe: command needs a {path} placeholder",
                "for each file's path relative to the data directory",
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


# -- fetching one file -------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def fetch(
    url: str,
    target: Path,
    sha256: str | None = None,
    size: int | None = None,
    retries: int | None = None,
) -> None:
    """Stream `url` to `target` through a temporary file; check size and sha256 (when given)
    before the rename, so `target` is either absent or complete and correct.

    Args:
        url: an http(s)/ftps/sftp/scp URL (fetched with curl), a `pipe:` command, or another
            URL webdataset's `gopen` opens.
        retries: curl's tries after a transient failure; None: `RETRIES`.

    Raises:
        FetchError: one line naming `url` and the cause in plain words.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}.part")
    digest, written = hashlib.sha256(), 0
    try:
        with _cache_errors(url, target.parent):
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as out, _download(url, retries) as stream:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
        if size is not None and written != size:
            what = f"got {written} bytes, the manifest says {size}: the server's file is cut short"
            raise FetchError(url, "size mismatch", f"{what} or another one", "file")
        if sha256 is not None and digest.hexdigest() != sha256:
            what = "the server's file differs from the manifest's: a corpus rebuilt on the server"
            raise FetchError(url, "checksum mismatch", f"{what} mid-run?", "file")
        with _cache_errors(url, target.parent):
            os.replace(temporary, target)
            if sha256 is not None:
                _note(target).write_text(sha256)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def _cache_errors(url: str, directory: Path) -> Iterator[None]:
    """The local cache's OSErrors (the disk full, a directory not writable) as FetchErrors."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FetchError(url, "the local cache disk is full", f"no space left in "
                             f"{directory}: free some, or set data.cache_dir to a larger disk",
                             "local") from error  # fmt: skip
        raise FetchError(url, "the local cache is not writable", f"{error.strerror}: "
                         f"{error.filename or directory}; set data.cache_dir to a writable "
                         "directory", "local") from error  # fmt: skip


@contextmanager
def _download(url: str, retries: int | None) -> Iterator[_Readable]:
    """`url`'s bytes as a stream (a command's stdout); FetchError when it fails.

    curl (and a `pipe:` command) is started here rather than through webdataset's `gopen`,
    which starts the same command but reports a failure as its argument list and exit status,
    without the command's stderr: what a user needs to know (404, refused, stalled) is there.
    """
    if url.startswith("pipe:"):
        command: str | list[str] = url[len("pipe:") :]
    elif urlparse(url).scheme.lower() in _CURL_SCHEMES:
        command = _curl_command(url, RETRIES if retries is None else retries)
    else:
        with _gopened(url) as stream:
            yield stream
        return
    with tempfile.TemporaryFile() as said:  # the command's stderr: why it failed, if it does
        try:
            process = subprocess.Popen(command, shell=isinstance(command, str),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=said)  # fmt: skip
        except FileNotFoundError as error:
            raise FetchError(url, "curl is not installed", "kiln fetches "
                             f"{'/'.join(_CURL_SCHEMES)} URLs with it") from error  # fmt: skip
        assert process.stdout is not None
        complete = False
        try:
            yield process.stdout
            complete = True
        finally:
            if not complete:  # the local side failed: the command's fate is beside the point
                process.kill()
            process.stdout.close()
            status = process.wait()
        if status != 0:
            said.seek(max(0, said.seek(0, os.SEEK_END) - 4096))
            text = said.read().decode(errors="replace")
            if isinstance(command, str):
                raise _command_error(url, status, text)
            raise _curl_error(url, status, text, RETRIES if retries is None else retries)


def _curl_command(url: str, retries: int) -> list[str]:
    # --fail: an HTTP error is exit status 22 with its code on stderr, not the error page
    return ["curl", "--fail", "--silent", "--show-error", "--location",
            "--connect-timeout", str(CONNECT_TIMEOUT_S),
            "--speed-limit", "1024", "--speed-time", str(STALL_S),
            "--retry", str(retries), url]  # fmt: skip


_BROKEN = (16, 18, 55, 56, 92)  # curl: the connection broke mid-transfer
_TLS = (35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91)


def _curl_error(url: str, status: int, said: str, retries: int) -> FetchError:
    """curl's exit status (and stderr) in plain words."""
    parts = urlparse(url)
    server, host = parts.netloc, parts.hostname or parts.netloc
    tried = f", {retries + 1} tries" if retries else ""
    if status == 22:
        codes = re.findall(r"returned error: (\d{3})", said)
        return _http_error(url, int(codes[-1]) if codes else None, _last_line(said), tried)
    if status == 6:
        return FetchError(url, "host not found", f"no address for {host}{tried}: a typo in "
                          f"data.path, or no DNS on this machine?")  # fmt: skip
    if status == 5:
        return FetchError(url, "proxy not found", f"check $http_proxy/$https_proxy{tried}")
    if status == 7:
        if re.search(r"no route|unreachable", said, re.IGNORECASE):
            return FetchError(url, "host unreachable", f"no route to {server}")
        return FetchError(url, "connection refused", f"nothing answers at {server}: is the "
                          "server running?")  # fmt: skip
    if status == 28:
        if "too slow" in said:
            what = f"the transfer stalled: under 1 KiB/s for {STALL_S} s"
        elif "Resolving timed out" in said:
            what = f"no DNS answer for {host}"
        else:
            what = f"no connection to {server} within {CONNECT_TIMEOUT_S} s"
        return FetchError(url, "timed out", what + tried)
    if status == 52:
        return FetchError(url, "no answer", "the server closed the connection without one")
    if status in _BROKEN:
        return FetchError(url, "connection broken", "the server closed or reset it "
                          "mid-transfer")  # fmt: skip
    if status in _TLS:
        return FetchError(url, "TLS failure", _last_line(said))
    if status == 47:
        return FetchError(url, "too many redirects")
    if status == 3:
        return FetchError(url, "malformed URL", "check data.path")
    if status == 67:
        return FetchError(url, "login denied", _last_line(said))
    return FetchError(url, f"curl failed (exit status {status})", _last_line(said))


def _http_error(url: str, code: int | None, said: str, tried: str) -> FetchError:
    if code is None:
        return FetchError(url, "HTTP error", said)
    if code in (404, 410):
        return FetchError(url, f"HTTP {code}", "not found on the server", "file")
    if code == 401:
        return FetchError(url, "HTTP 401", "the server asks for credentials")
    if code == 403:  # also a missing object, from a bucket that does not list
        return FetchError(url, "HTTP 403", "access denied by the server", "file")
    if code == 429:
        return FetchError(url, "HTTP 429", f"too many requests for the server{tried}")
    if code >= 500:
        return FetchError(url, f"HTTP {code}", f"a server error{tried}")
    return FetchError(url, f"HTTP {code}", said, "file")


def _command_error(url: str, status: int, said: str) -> FetchError:
    """A `pipe:` command's failure; what it said last on stderr is its reason."""
    if status == 127:
        cause = "command not found"
    elif status < 0:
        cause = f"the command was killed by signal {-status}"
    else:
        cause = f"the command failed (exit status {status})"
    return FetchError(url, cause, _last_line(said), "file")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextmanager
def _gopened(url: str) -> Iterator[_Readable]:
    """`url` opened with webdataset's `gopen` (gs, ais, hf: a command per scheme, whose own
    stderr reaches the log), its failures as FetchErrors."""
    from webdataset.gopen import gopen  # imports torch: only for these schemes

    scheme = urlparse(url).scheme
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError as error:  # the scheme's command is not installed
        raise FetchError(url, f"{error.filename} is not installed", "webdataset fetches "
                         f"{scheme}:// URLs with it") from error  # fmt: skip
    except Exception as error:  # hf:// resolves the URL with huggingface_hub first: its errors
        raise FetchError(url, "cannot be opened", f"{type(error).__name__}: {error}") from error

    class Checked:
        def read(self, size: int) -> bytes:
            try:
                return stream.read(size)
            except OSError as error:
                raise _gopen_error(url, scheme, error) from error

    try:
        yield Checked()
    except BaseException:
        with contextlib.suppress(OSError):  # the local side failed: the command's fate is
            stream.close()  # beside the point
        raise
    try:
        stream.close()
    except OSError as error:
        raise _gopen_error(url, scheme, error) from error


def _gopen_error(url: str, scheme: str, error: OSError) -> FetchError:
    status = re.search(r"exit (-?\d+)", str(error))  # webdataset's Pipe: "(args): exit N ..."
    if status is None:
        return FetchError(url, "read failed", str(error))
    return FetchError(url, f"the {scheme}:// fetch command failed (exit status "
                      f"{status[1]})", "its message is above", "file")  # fmt: skip


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


# -- the mirror of a data directory ------------------------------------------------------------


def mirror(path: str, cache_dir: str | None = None, on_bad_shard: str = "error") -> Path:
    """The local directory holding remote `path`'s manifest, tokenizer and shards.

    The manifest is fetched on every call (it is small, and a new run must not read a rebuilt
    corpus through a stale copy); a run keeps the build it started with, and reads the copy
    cached before when the fetch fails (a server gone since the run started): each evaluation
    builds its loader anew. The tokenizer and shards are fetched when the cache lacks them.
    With `on_bad_shard="skip"` a shard that cannot be fetched for its own fault (missing on
    the server, other bytes) is left out, said once per run on rank 0; the loader then counts
    it as missing. Otherwise the error names it, as it does a server that fails or cannot be
    reached while files are not cached: skipping those would drop every file not fetched yet,
    on some nodes and not others (each rank would then read its own order of other shards).
    """
    _check_fetchable(path)
    directory = cache_directory(path, cache_dir)
    asked = time.time()  # a failure met by another rank of this node since then stands
    started = time.monotonic()
    with _cache_errors(f"data.path={path}", directory), _locked(directory):
        for stale in directory.rglob(".*.part"):  # a fetch killed part way (none is in flight
            stale.unlink(missing_ok=True)  # now: each holds the lock)
        unreachable = _refresh_manifest(path, directory, asked)
        manifest = read_manifest(directory)  # read once before it replaced the cached copy
        tokenizer = manifest.tokenizer
        files = [(tokenizer.path, tokenizer.sha256, None)]
        files += [(record.path, record.sha256, record.bytes) for record in manifest.shards]
        wanted = [file for file in files if not _cached(directory / file[0], file[1], file[2])]
        new = first_time(f"fetch {directory / file[0]}" for file in wanted)
        if new and unreachable is None:  # said by the rank that fetches: others wait for it
            total = sum(file[2] or 0 for file in wanted)
            # on stderr, not the log (no handler shows INFO): a first download of a large
            # corpus would otherwise look like a hang
            print(f"kiln: data.path={path}: fetching {len(wanted)} file(s) ({_amount(total)}) "
                  f"into {directory}", file=sys.stderr, flush=True)  # fmt: skip
        skipped: dict[str, FetchError] = {}
        for relative, sha256, size in wanted:
            try:
                _fetch_into(path, directory, relative, sha256, size, asked, unreachable)
            except FetchError as error:
                if relative == tokenizer.path or error.kind == "local":
                    raise
                if on_bad_shard == "skip" and error.kind == "file":
                    skipped[relative] = error
                    continue
                raise _advised(error, on_bad_shard) from None
    _say_skipped(path, directory, skipped)
    if new and unreachable is None and len(wanted) > len(skipped):
        print(f"kiln: data.path={path}: {len(wanted) - len(skipped)} file(s) fetched in "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    return directory


def _amount(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _advised(error: FetchError, on_bad_shard: str) -> FetchError:
    """A shard's failure, with what `data.on_bad_shard` does about it."""
    if on_bad_shard == "skip":  # the server's fault: skipping would drop all files not cached
        return error.advised("data.on_bad_shard=skip skips bad shards, not an unreachable or "
                             "failing server")  # fmt: skip
    if error.kind == "file":
        return error.advised("data.on_bad_shard=skip would leave it out")
    return error


def _check_fetchable(path: str) -> None:
    """A `data.path` whose scheme nothing here fetches (s3://) is refused before any fetch."""
    if path.startswith("pipe:"):
        file_url(path, MANIFEST_NAME)  # has its {path}
        return
    scheme = urlparse(path).scheme.lower()
    if scheme in _CURL_SCHEMES:
        return
    from webdataset.gopen import gopen_schemes

    if scheme in gopen_schemes:
        return
    corpus = path.rstrip("/") if scheme == "s3" else "s3://bucket/corpus"
    raise FetchError(f"data.path={path}", f"no way to fetch {scheme}:// URLs", "use a pipe: "
                     "command that writes each file to stdout, such as data.path='pipe:aws s3 "
                     f"cp {corpus}/{{path}} -'")  # fmt: skip


def _refresh_manifest(path: str, directory: Path, asked: float) -> FetchError | None:
    """Fetch the manifest anew into `directory`, read before it replaces the cached copy.

    Returns None, or why it cannot be fetched now when a copy is cached (the server gone
    since the run started): that copy is then read, said once per run on rank 0. Without one
    the failure is the error. A manifest that differs from the one this process started with
    (a corpus rebuilt on the server mid-run) does not replace it: the run's loaders read the
    cached files lazily, and must go on reading the build they started with.
    """
    manifest, incoming = directory / MANIFEST_NAME, directory / _INCOMING
    try:
        # with a copy to fall back on, one try: each evaluation would wait out the retries
        retries = 0 if manifest.is_file() else None
        _fetch_into(path, incoming, MANIFEST_NAME, None, None, asked, None, retries)
        try:
            read_manifest(incoming)
        except ShardFormatError as error:
            text = str(error).removeprefix(f"{incoming / MANIFEST_NAME}: ")
            raise FetchError(file_url(path, MANIFEST_NAME), "not a kiln manifest", text,
                             "file") from error  # fmt: skip
    except FetchError as error:
        if error.kind == "local" or not manifest.is_file():
            raise _manifest_error(path, error) from None
        if first_time([f"manifest {directory}"]) and is_rank_zero():
            log.warning("data.path=%s: %s cannot be fetched now: %s; reading the copy cached in "
                        "%s (said once; each evaluation tries again)", path, MANIFEST_NAME,
                        error.reason, directory)  # fmt: skip
        _started_with.setdefault(directory, sha256_file(manifest))
        return error
    fetched = sha256_file(incoming / MANIFEST_NAME)
    started = _started_with.setdefault(directory, fetched)
    if fetched == started:
        os.replace(incoming / MANIFEST_NAME, manifest)
    elif first_time([f"rebuilt {directory}"]) and is_rank_zero():
        log.warning("data.path=%s: the server holds another build now (its %s changed since "
                    "this run started); the run goes on reading the one it started with, cached "
                    "in %s (a new run reads the new one)", path, MANIFEST_NAME, directory)  # fmt: skip
    return None


def _manifest_error(path: str, error: FetchError) -> FetchError:
    """A first manifest fetch's failure, with what a wrong `data.path` would explain."""
    if error.cause not in ("HTTP 404", "HTTP 410", "not a kiln manifest"):
        return error
    base = path.rstrip("/")
    if base.endswith("/" + MANIFEST_NAME):
        hint = f"data.path is the directory holding it: use data.path={base[: -len(MANIFEST_NAME)]}"
    else:
        hint = f"is data.path the directory `kiln data` wrote, holding {MANIFEST_NAME}?"
    return error.explained(f"{error.detail}: {hint}")


def _fetch_into(
    path: str,
    directory: Path,
    relative: str,
    sha256: str | None,
    size: int | None,
    asked: float,
    unreachable: FetchError | None,
    retries: int | None = None,
) -> None:
    """Fetch `relative` under `path` into `directory`, noting a failure next to it.

    Not tried when the manifest could not be fetched (`unreachable`): a file that failed for
    its own fault before (a shard skipped since) fails as it did, any other is the server's
    fault. Nor when another rank of this node failed to while this one waited for the lock
    (since `asked`): its failure stands, so the ranks of a node do not each wait out the same
    timeouts in turn.
    """
    url, target = file_url(path, relative), directory / relative
    failed = target.with_name(f".{target.name}.failed")
    if failed.is_file() and (unreachable is not None or failed.stat().st_mtime >= asked):
        kind, cause, detail = (failed.read_text().split("\n") + ["", ""])[:3]
        if kind == "file" or unreachable is None:
            raise FetchError(url, cause, detail, kind)
    if unreachable is not None:  # not cached here: a node the earlier runs did not fill
        raise FetchError(url, "not cached", f"{MANIFEST_NAME} cannot be fetched now either: "
                         f"{unreachable.cause}")  # fmt: skip
    try:
        fetch(url, target, sha256, size, retries)
    except FetchError as error:
        if error.kind != "local":
            with contextlib.suppress(OSError):
                failed.write_text(f"{error.kind}\n{error.cause}\n{error.detail}")
        raise
    failed.unlink(missing_ok=True)


def _say_skipped(path: str, directory: Path, skipped: dict[str, FetchError]) -> None:
    """Once per run and shard, on rank 0 (the loader, which then finds them missing, says
    nothing more of them: the keys are the local paths it checks)."""
    relative = {str(directory / shard): shard for shard in skipped}
    new = [relative[key] for key in first_time(relative)]
    if new and is_rank_zero():
        listed = ", ".join(f"{shard} ({skipped[shard].cause})" for shard in new)
        log.warning("data.path=%s: skipping %d shard(s) that cannot be fetched: %s", path,
                    len(new), listed)  # fmt: skip
