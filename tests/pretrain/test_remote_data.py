"""`data.path` as a URL (a real HTTP server on 127.0.0.1) or a `pipe:` command: the shards are
fetched once into the cache, checked against the manifest, and give the local batches; a fetch
that fails is one line naming the file's URL and the cause, said once per run on rank 0."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from test_loader import CausalWindows, config, write_corpus

from data_pipeline.shards import read_manifest, write_manifest
from pretrain.data import notices, remote
from pretrain.data.loader import DataError, build_loader
from pretrain.data.remote import FetchError, fetch, mirror


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]
    failing: dict[str, int]  # path: the HTTP status it answers instead of the file
    requested: threading.Event  # set at each request for a failing path
    delay = 0.0  # seconds before a failing path's answer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        status = self.failing.get(self.path) or self.failing.get(self.path.rpartition("/")[0])
        if status is None:
            super().do_GET()
            return
        self.requested.set()
        time.sleep(self.delay)
        self.send_error(status)

    def log_message(self, *args: object) -> None:
        pass


@dataclasses.dataclass
class Served:
    root: Path
    url: str
    requests: list[str]
    failing: dict[str, int]  # set by a test: path (or directory) -> HTTP status
    handler: type[_Handler]
    stop: Callable[[], None]  # the server goes away: its port refuses connections


@pytest.fixture(autouse=True)
def new_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test is a run of its own (what was said, the build it started with); curl gives
    up at once, so that a failing server fails the test in seconds."""
    monkeypatch.setattr(remote, "RETRIES", 0)
    monkeypatch.delenv("RANK", raising=False)
    notices.forget()
    remote._started_with.clear()
    yield
    notices.forget()
    remote._started_with.clear()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A corpus with a real tokenizer file, served over HTTP on 127.0.0.1."""
    root = tmp_path / "served"
    manifest = write_corpus(root, {"web": [20, 9, 12], "code": [15]}, {"web": 0.5, "code": 0.5})
    (root / "tokenizer.model").write_bytes(b"not a real model, but its sha256 is checked")
    sha = hashlib.sha256((root / "tokenizer.model").read_bytes()).hexdigest()
    write_manifest(root, dataclasses.replace(
        manifest, tokenizer=dataclasses.replace(manifest.tokenizer, sha256=sha)))  # fmt: skip
    requests: list[str] = []
    failing: dict[str, int] = {}
    handler = type("Handler", (_Handler,), {"requests": requests, "failing": failing,
                                           "requested": threading.Event()})  # fmt: skip
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        yield Served(root, url, requests, failing, handler, stop)
    finally:
        stop()


def batches(path: str, cache: Path, **data: object) -> list[dict[str, torch.Tensor]]:
    cfg = config(Path("unused"), **data)
    cfg.data.path, cfg.data.cache_dir = path, str(cache)
    return list(build_loader(cfg, CausalWindows(), num_steps=6).loader)


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_http_path_gives_the_local_batches_and_fetches_once(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, url, requests = served.root, served.url, served.requests
    local = batches(str(root), tmp_path / "unused-cache")
    assert len(local) == 6 * 6
    capsys.readouterr()
    fetched = batches(url, tmp_path / "cache")
    assert same(fetched, local)
    shards = [r.path for r in read_manifest(root).shards]
    assert sorted(requests) == sorted(
        ["/manifest.json", "/tokenizer.model"] + [f"/{p}" for p in shards]
    )
    # a first download says what it fetches (a large one would look like a hang)
    said = capsys.readouterr().err.splitlines()
    assert said[0].startswith(f"kiln: data.path={url}: fetching {len(shards) + 1} file(s) (")
    assert f") into {tmp_path / 'cache'}/" in said[0]  # one directory per data.path
    assert re.fullmatch(rf"kiln: data.path={re.escape(url)}: {len(shards) + 1} file\(s\) "
                        r"fetched in [\d.]+ s", said[1])  # fmt: skip
    requests.clear()
    cache = remote.cache_directory(url, str(tmp_path / "cache"))
    killed = cache / "shards" / f".{Path(shards[0]).name}.99999.part"  # a fetch killed part way
    killed.write_bytes(b"half a shard")
    assert same(batches(url, tmp_path / "cache"), local)
    assert requests == ["/manifest.json"]  # the rest comes from the cache
    assert capsys.readouterr().err == ""  # nothing fetched, nothing said
    assert not killed.exists()  # its space freed


def test_a_server_gone_after_the_first_fetch_leaves_the_cached_copy(
    served: Served, tmp_path: Path
) -> None:
    """Each evaluation builds its loader anew, fetching the manifest: with the server gone
    mid-run, evaluation was turned off for the rest of the run. The cached copy serves."""
    root, url = served.root, served.url
    fetched = batches(url, tmp_path / "cache")
    (root / "manifest.json").rename(root / "moved.json")  # the server answers 404 now
    assert same(batches(url, tmp_path / "cache"), fetched)
    with pytest.raises(DataError, match=r"manifest.json: HTTP 404 \(not found on the server"):
        batches(url, tmp_path / "other-cache")  # nothing cached: the error, as before


def test_pipe_command_gives_the_local_batches(served: Served, tmp_path: Path) -> None:
    root = served.root
    remote = batches(f"pipe:cat {root}/{{path}}", tmp_path / "cache")
    assert same(remote, batches(str(root), tmp_path / "unused"))
    with pytest.raises(DataError, match=r"\{path\} placeholder"):
        batches(f"pipe:cat {root}/manifest.json", tmp_path / "cache2")


def test_corrupt_and_missing_remote_shards(served: Served, tmp_path: Path) -> None:
    root, url = served.root, served.url
    shards = read_manifest(root).shards
    corrupt, missing = root / shards[0].path, root / shards[2].path
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:100] + bytes(len(data) - 100))  # same size, other bytes
    with pytest.raises(DataError, match=rf"{shards[0].path}: checksum mismatch"):
        batches(url, tmp_path / "cache")
    cached = list((tmp_path / "cache").rglob("*.tar"))
    assert all(p.name != corrupt.name for p in cached)  # never renamed into place
    shutil.move(missing, tmp_path / "moved.tar")
    cfg = config(Path("unused"), on_bad_shard="skip")
    cfg.data.path, cfg.data.cache_dir = url, str(tmp_path / "cache")
    loader = build_loader(cfg, CausalWindows(), num_steps=2)
    cache = next((tmp_path / "cache").iterdir())
    assert loader.skipped_shards == [
        f"{cache / shards[0].path}: missing",
        f"{cache / shards[2].path}: missing",
    ]
    assert [r.path for r in loader.dataset.shards["web"]] == [shards[1].path]
    assert len(list(loader.loader)) == 2 * 6
    cfg.data.on_bad_shard = "error"
    with pytest.raises(DataError, match=rf"{shards[0].path}"):
        build_loader(cfg, CausalWindows(), num_steps=2)
    cfg.data.path = url + "nowhere/"
    with pytest.raises(DataError, match=r"nowhere/manifest.json: HTTP 404"):
        build_loader(cfg, CausalWindows(), num_steps=2)


def _one_line(error: BaseException, url: str, cause: str) -> None:
    """The error is a line naming the file's URL and the cause, without curl's own words."""
    text = str(error)
    assert "\n" not in text and text.startswith(f"{url}: {cause}"), text
    assert "curl" not in text and "exit" not in text, text


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_each_fetch_failure_is_one_line_with_its_cause(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, url = served.root, served.url
    shards = read_manifest(root).shards
    target = tmp_path / "cache" / "file"
    port = _closed_port()
    with pytest.raises(FetchError) as refused:
        fetch(f"http://127.0.0.1:{port}/manifest.json", target)
    _one_line(refused.value, f"http://127.0.0.1:{port}/manifest.json", "connection refused")
    assert f"nothing answers at 127.0.0.1:{port}: is the server running?" in str(refused.value)

    # curl's report of a name that does not resolve (asked of no DNS server: tests stay on
    # 127.0.0.1)
    unknown = remote._curl_error("http://no-such-host.invalid/manifest.json", 6,
                                 "curl: (6) Could not resolve host: no-such-host.invalid", 0)  # fmt: skip
    _one_line(unknown, "http://no-such-host.invalid/manifest.json", "host not found")

    served.failing["/shards"] = 503
    with pytest.raises(FetchError) as failing:
        fetch(url + shards[0].path, target)
    _one_line(failing.value, url + shards[0].path, "HTTP 503 (a server error)")
    assert served.requests.count(f"/{shards[0].path}") == 1  # remote.RETRIES = 0 here
    served.failing.clear()

    monkeypatch.setattr(remote, "STALL_S", 1)
    with socket.socket() as silent:  # connects (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        stalled = f"http://127.0.0.1:{silent.getsockname()[1]}/manifest.json"
        with pytest.raises(FetchError) as timed_out:
            fetch(stalled, target)
    _one_line(timed_out.value, stalled, "timed out (the transfer stalled: under 1 KiB/s for 1 s)")

    record = shards[1]
    with pytest.raises(FetchError) as mismatch:
        fetch(url + record.path, target, "0" * 64, record.bytes)
    _one_line(mismatch.value, url + record.path, "checksum mismatch (the server's file differs "
              "from the manifest's: a corpus rebuilt on the server mid-run?)")  # fmt: skip
    with pytest.raises(FetchError) as short:
        fetch(url + record.path, target, record.sha256, record.bytes + 1)
    _one_line(short.value, url + record.path, f"size mismatch (got {record.bytes} bytes, the "
              f"manifest says {record.bytes + 1}")  # fmt: skip
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing half-written

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to stand for a full disk")
    # the temporary file a fetch writes, opened through a link to /dev/full: ENOSPC, as a
    # full disk gives
    (target.parent / f".{target.name}.{os.getpid()}.part").symlink_to("/dev/full")
    with pytest.raises(FetchError) as full:
        fetch(url + record.path, target, record.sha256, record.bytes)
    _one_line(full.value, url + record.path, "the local cache disk is full (no space left in "
              f"{target.parent}: free some, or set data.cache_dir to a larger disk)")  # fmt: skip
    assert full.value.kind == "local" and not target.exists()


def test_shard_errors_say_what_on_bad_shard_does(served: Served, tmp_path: Path) -> None:
    root, url = served.root, served.url
    shards = read_manifest(root).shards
    (root / shards[2].path).unlink()
    with pytest.raises(DataError) as missing:
        batches(url, tmp_path / "cache")
    assert str(missing.value) == (
        f"{url}{shards[2].path}: HTTP 404 (not found on the server); data.on_bad_shard=skip "
        "would leave it out"
    )
    # a failing server is no bad shard: skipping would drop every file not cached yet
    served.failing["/shards"] = 503
    with pytest.raises(DataError) as failing:
        batches(url, tmp_path / "other-cache", on_bad_shard="skip")
    assert str(failing.value) == (
        f"{url}{shards[0].path}: HTTP 503 (a server error); data.on_bad_shard=skip skips bad "
        "shards, not an unreachable or failing server"
    )


def test_a_wrong_data_path_says_what_it_should_be(served: Served, tmp_path: Path) -> None:
    url = served.url
    with pytest.raises(DataError) as manifest:
        batches(url + "manifest.json", tmp_path / "cache")
    assert str(manifest.value) == (
        f"{url}manifest.json/manifest.json: HTTP 404 (not found on the server: data.path is the "
        f"directory holding it: use data.path={url})"
    )
    with pytest.raises(DataError) as shards:
        batches(url + "shards/", tmp_path / "cache")
    assert str(shards.value) == (
        f"{url}shards/manifest.json: HTTP 404 (not found on the server: is data.path the "
        "directory `kiln data` wrote, holding manifest.json?)"
    )
    with pytest.raises(DataError) as s3:
        batches("s3://bucket/corpus/", tmp_path / "cache")
    assert str(s3.value) == (
        "data.path=s3://bucket/corpus/: no way to fetch s3:// URLs (use a pipe: command that "
        "writes each file to stdout, such as data.path='pipe:aws s3 cp s3://bucket/corpus/{path} "
        "-')"
    )
    with pytest.raises(DataError) as command:
        batches("pipe:cat /nonexistent/{path}", tmp_path / "cache")
    assert str(command.value) == (
        "pipe:cat /nonexistent/manifest.json: the command failed (exit status 1) (cat: "
        "/nonexistent/manifest.json: No such file or directory)"
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("rank", [0, 1])
def test_skips_and_a_gone_server_are_said_once_per_run_on_rank_zero(
    served: Served,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    rank: int,
) -> None:
    """Every rank, and each evaluation (which builds its loader anew), mirrors the data path:
    a skipped shard or the cached manifest was said by each of them, every time."""
    root, url = served.root, served.url
    monkeypatch.setenv("RANK", str(rank))
    shards = read_manifest(root).shards
    corrupt = root / shards[0].path
    corrupt.write_bytes(bytes(corrupt.stat().st_size))
    (root / shards[2].path).unlink()
    for _ in range(2):  # the training loader, then an evaluation's
        assert len(batches(url, tmp_path / "cache", on_bad_shard="skip")) == 6 * 6
    (root / "manifest.json").unlink()  # the server loses it mid-run: the cached copy serves
    for _ in range(2):
        batches(url, tmp_path / "cache", on_bad_shard="skip")
    cache = remote.cache_directory(url, str(tmp_path / "cache"))
    said = [
        f"data.path={url}: skipping 2 shard(s) that cannot be fetched: {shards[0].path} "
        f"(checksum mismatch), {shards[2].path} (HTTP 404)",
        f"data.path={url}: manifest.json cannot be fetched now: HTTP 404 (not found on the "
        f"server); reading the copy cached in {cache} (said once; each evaluation tries again)",
    ]
    assert _warnings(caplog) == (said if rank == 0 else [])
    # the failing shards were tried again by each call while the manifest could be fetched
    assert served.requests.count(f"/{shards[2].path}") == 2


def test_local_shards_skipped_are_said_once(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = served.root
    shards = read_manifest(root).shards
    (root / shards[2].path).unlink()
    for _ in range(3):
        batches(str(root), tmp_path / "unused", on_bad_shard="skip")
    assert _warnings(caplog) == [f"skipping 1 shard(s) of {root}: {shards[2].path} (missing)"]


def test_a_failure_met_by_another_rank_of_the_node_is_not_met_again(
    served: Served, tmp_path: Path
) -> None:
    """The ranks of a node take turns under the cache's lock: each waited out the same
    timeouts (a server gone: up to minutes each) in turn. Who waited reuses the failure."""
    url, record = served.url, read_manifest(served.root).shards[1]
    served.failing[f"/{record.path}"] = 503
    served.handler.delay = 0.5  # the first rank holds the lock while the second one waits
    errors: list[str] = []

    def rank() -> None:
        try:
            mirror(url, str(tmp_path / "cache"))
        except FetchError as error:
            errors.append(str(error))

    first = threading.Thread(target=rank)
    first.start()
    assert served.handler.requested.wait(10)
    second = threading.Thread(target=rank)  # asks while the first one fetches
    second.start()
    first.join()
    second.join()
    assert served.requests.count(f"/{record.path}") == 1
    assert errors == [f"{url}{record.path}: HTTP 503 (a server error)"] * 2
    served.handler.delay = 0.0
    with pytest.raises(FetchError):  # a later call, after the failure: tries again
        mirror(url, str(tmp_path / "cache"))
    assert served.requests.count(f"/{record.path}") == 2


def test_a_corpus_rebuilt_on_the_server_mid_run_is_not_read_by_that_run(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An evaluation's fetch of the manifest replaced the cached shards with the new build's
    while the training loader read them (lazily, by path): "holds N tokens, the manifest
    says M" mid-run, or other tokens than the run started with. The run keeps its build."""
    root, url = served.root, served.url
    before = batches(url, tmp_path / "cache")
    cache = remote.cache_directory(url, str(tmp_path / "cache"))
    started = (cache / "manifest.json").read_bytes()
    shutil.rmtree(root / "shards")
    rebuilt = write_corpus(root, {"web": [11, 13, 7], "code": [17]}, {"web": 0.5, "code": 0.5})
    write_manifest(root, dataclasses.replace(rebuilt, tokenizer=read_manifest(cache).tokenizer))
    for _ in range(2):
        assert same(batches(url, tmp_path / "cache"), before)
    assert (cache / "manifest.json").read_bytes() == started
    assert _warnings(caplog) == [
        f"data.path={url}: the server holds another build now (its manifest.json changed since "
        f"this run started); the run goes on reading the one it started with, cached in {cache} "
        "(a new run reads the new one)"
    ]
    remote._started_with.clear()  # a new run
    assert not same(batches(url, tmp_path / "cache"), before)
    assert read_manifest(cache).shards == read_manifest(root).shards


def test_with_the_server_gone_only_the_shards_bad_before_are_skipped(
    served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A resume (or an evaluation) with the server gone reads the cache: a shard skipped for
    its own fault before stays skipped; one the cache lacks for no such fault (a node the
    earlier runs did not fill) is the server's fault, not skipped: the ranks of that node would
    read other shards, in another order, than the others."""
    root, url = served.root, served.url
    shards = read_manifest(root).shards
    (root / shards[2].path).unlink()
    before = batches(url, tmp_path / "cache", on_bad_shard="skip")
    served.stop()
    notices.forget()  # a new run
    remote._started_with.clear()
    assert same(batches(url, tmp_path / "cache", on_bad_shard="skip"), before)
    cache = remote.cache_directory(url, str(tmp_path / "cache"))
    assert _warnings(caplog)[-2:] == [
        f"data.path={url}: manifest.json cannot be fetched now: connection refused (nothing "
        f"answers at {url[len('http://') : -1]}: is the server running?); reading the copy "
        f"cached in {cache} (said once; each evaluation tries again)",
        f"data.path={url}: skipping 1 shard(s) that cannot be fetched: {shards[2].path} (HTTP 404)",
    ]
    (cache / shards[0].path).unlink()
    with pytest.raises(DataError) as lacking:
        batches(url, tmp_path / "cache", on_bad_shard="skip")
    assert str(lacking.value) == (
        f"{url}{shards[0].path}: not cached (manifest.json cannot be fetched now either: "
        "connection refused); data.on_bad_shard=skip skips bad shards, not an unreachable or "
        "failing server"
    )
