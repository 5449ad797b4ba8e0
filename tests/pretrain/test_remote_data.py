"""`data.path` as a URL (a real HTTP server on 127.0.0.1) or a `pipe:` command: the shards are
fetched once into the cache, checked against the manifest, and give the local batches."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch
from test_loader import CausalWindows, config, write_corpus

from data_pipeline.shards import read_manifest, write_manifest
from pretrain.data.loader import DataError, build_loader


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A corpus with a real tokenizer file, served over HTTP on 127.0.0.1."""
    root = tmp_path / "served"
    manifest = write_corpus(root, {"web": [20, 9, 12], "code": [15]}, {"web": 0.5, "code": 0.5})
    (root / "tokenizer.model").write_bytes(b"not a real model, but its sha256 is checked")
    sha = hashlib.sha256((root / "tokenizer.model").read_bytes()).hexdigest()
    write_manifest(root, dataclasses.replace(
        manifest, tokenizer=dataclasses.replace(manifest.tokenizer, sha256=sha)))  # fmt: skip
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


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
    served: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    root, url, requests = served
    local = batches(str(root), tmp_path / "unused-cache")
    assert len(local) == 6 * 6
    remote = batches(url, tmp_path / "cache")
    assert same(remote, local)
    shards = [r.path for r in read_manifest(root).shards]
    assert sorted(requests) == sorted(
        ["/manifest.json", "/tokenizer.model"] + [f"/{p}" for p in shards]
    )
    requests.clear()
    assert same(batches(url, tmp_path / "cache"), local)
    assert requests == ["/manifest.json"]  # the rest comes from the cache


def test_a_server_gone_after_the_first_fetch_leaves_the_cached_copy(
    served: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    """Each evaluation builds its loader anew, fetching the manifest: with the server gone
    mid-run, evaluation was turned off for the rest of the run. The cached copy serves."""
    root, url, _ = served
    remote = batches(url, tmp_path / "cache")
    (root / "manifest.json").rename(root / "moved.json")  # the server answers 404 now
    assert same(batches(url, tmp_path / "cache"), remote)
    with pytest.raises(DataError, match="no readable manifest"):
        batches(url, tmp_path / "other-cache")  # nothing cached: the error, as before


def test_pipe_command_gives_the_local_batches(
    served: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    root, _, _ = served
    remote = batches(f"pipe:cat {root}/{{path}}", tmp_path / "cache")
    assert same(remote, batches(str(root), tmp_path / "unused"))
    with pytest.raises(DataError, match=r"\{path\} placeholder"):
        batches(f"pipe:cat {root}/manifest.json", tmp_path / "cache2")


def test_corrupt_and_missing_remote_shards(
    served: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    root, url, _ = served
    shards = read_manifest(root).shards
    corrupt, missing = root / shards[0].path, root / shards[2].path
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[:100] + bytes(len(data) - 100))  # same size, other bytes
    with pytest.raises(DataError, match=rf"{shards[0].path}: sha256 .* does not match"):
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
    with pytest.raises(DataError, match=r"nowhere/manifest.json.*fetch failed"):
        build_loader(cfg, CausalWindows(), num_steps=2)
