"""bench/gpu_bundle.py (issue #9): the bundle a GPU host with only PyTorch needs. Built here, then
run by its own `run.sh` under the base interpreter with this environment's packages minus the
bundled ones and those the GPU host lacks (DeepSpeed, Ray, W&B, webdataset...), so hydra,
omegaconf and torchao can only come from the bundle: the smoke mode's trainer runs (the FP8 one
included) must still go through."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
BUNDLED = ("hydra", "hydra_core", "omegaconf", "antlr4", "torchao")
# kiln's dependencies that the H200 image does not hold (the device tool's KINDS.md package
# list): the GPU script's path must not import them
NOT_ON_THE_GPU_HOST = ("deepspeed", "ray", "wandb", "webdataset", "datasketch", "zstandard")


def bare_site(tmp: Path, also_without: tuple[str, ...] = ()) -> Path:
    """This environment's site-packages without the bundled packages, those the GPU host lacks
    (nor kiln's editable install: run.sh puts the repository on the path), as symlinks. Under
    scripts/test-with-torch.sh the environment is two: that torch's venv first, then (through
    a .pth file) the project's venv for everything else; the first of a name wins."""
    sites = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("-packages"))]
    bare = tmp / ("bare" + "".join(f"-{name}" for name in also_without))
    bare.mkdir()
    left_out = (*BUNDLED, *NOT_ON_THE_GPU_HOST, *also_without, "__editable__", "kiln")
    taken: set[str] = set()
    for site in dict.fromkeys(Path(p) for p in sites):
        names = {entry.name: entry.name.split("-")[0].lower() for entry in site.iterdir()}
        for name, project in names.items():  # a package's directory and its .dist-info
            if not name.lower().startswith(left_out) and project not in taken:
                (bare / name).symlink_to(site / name)
        taken |= set(names.values())
    return bare


def run_bundle(bundle: Path, bare: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PYTHON": sys._base_executable, "PYTHONPATH": str(bare), "KILN_REPO": str(REPO),
            "OUT": str(out)}  # fmt: skip
    return subprocess.run(["bash", str(bundle / "run.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_bundle_runs_the_gpu_script_without_the_bundled_packages_installed(
    tmp_path: Path, smoke_data: Path
) -> None:
    bundle = tmp_path / "bundle"
    built = subprocess.run(
        [sys.executable, "bench/gpu_bundle.py", "--out", str(bundle), "--smoke", "--data",
         str(smoke_data)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    summary = json.loads((bundle / "bundle.json").read_text())
    assert set(summary["packages"]) == {"hydra-core", "omegaconf", "antlr4-python3-runtime",
                                        "torchao"}  # fmt: skip
    for name, info in summary["packages"].items():
        dist = importlib.metadata.distribution(name)
        assert info["version"] == dist.version
        # every file of the installed distribution inside site-packages, bytecode aside
        wanted = {str(f) for f in dist.files if not str(f).startswith("..")
                  and "__pycache__" not in str(f)}  # fmt: skip
        assert all((bundle / "site" / f).is_file() for f in wanted), name
    assert (bundle / "data" / "manifest.json").is_file()
    assert summary["data"]["source"] == str(smoke_data)  # `--data`: a copy of that build
    assert 0 < summary["bytes"] < 64 * 2**20  # what a device session carries

    # the base interpreter and every other package of this environment: hydra, omegaconf,
    # antlr4 and torchao only from the bundle
    out = tmp_path / "out"
    done = run_bundle(
        bundle, bare_site(tmp_path), out, "--smoke", "--profile", "gpt2_124m",
        "--skip", "plain_124m,gpt2_350m,gpt2_124m_docmask,plain_124m_docmask,moe,gpt2_124m_blocks",
        "--extra", "gpt2_124m_float8",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    assert results["failed"] is False and set(results["runs"]) == {"gpt2_124m", "gpt2_124m_float8"}
    for run in results["runs"].values():
        assert run["tokens_per_s"] > 0 and run["steps"] == 6
    assert "engine.float8=true" in results["runs"]["gpt2_124m_float8"]["overrides"]
    packages = results["stages"]["env"]["result"]["packages"]
    for module in ("hydra", "omegaconf", "torchao"):
        assert packages[module]["path"].startswith(str(bundle / "site")), packages[module]
    assert packages["torchao"]["version"] == summary["packages"]["torchao"]["version"]
    assert results["stages"]["data"]["result"]["path"] == str(bundle / "data")
    assert "[gpu] gpt2_124m_float8:" in (out / "gpu.log").read_text()
    assert list((out / "traces" / "gpt2_124m").glob("*/*.trace.json.gz"))

    # a host missing what the bundle does not carry is told which module before anything runs
    done = run_bundle(bundle, bare_site(tmp_path, ("sentencepiece",)), tmp_path / "out2", "--smoke")
    assert done.returncode == 2
    assert "Python module 'sentencepiece' is missing" in done.stderr
    assert not (tmp_path / "out2" / "gpu.json").exists()
