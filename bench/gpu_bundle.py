"""Everything `bench/gpu.py` needs on a GPU host that has only PyTorch, in one directory.

A rented H100/H200 often comes with a CUDA image's PyTorch and no network: no `make install`,
no Ray to build shards. This script, run where kiln is installed, writes (default
`.gpu_bundle/`, git-ignored):

- `site/`: the pure-Python packages the trainer imports that such an image lacks (hydra-core,
  omegaconf, antlr4-python3-runtime) and torchao (the FP8 extras; `--no-torchao` to leave it
  out), copied file by file from this environment's installed distributions, with their
  metadata, so `importlib.metadata` sees their versions there too;
- `data/`: stdlib shards built by `kiln data` (or a copy of `--data DIR`);
- `run.sh`: `bench/gpu.py` with `site/` and the repository on `PYTHONPATH` and `--data data/`,
  writing results, log and traces to `$OUT` (default `bench/results/`); its arguments go to
  `bench/gpu.py`;
- `bundle.json`: what is inside (versions, bytes, commit, date).

Carry the repository and the bundle to the GPU host and run `bash .gpu_bundle/run.sh`. The
copied packages are pure Python except torchao's optional kernels (abi3; float8 training is
Python over torch's `_scaled_mm`), so the host's Python may differ from this one's.

    python bench/gpu_bundle.py                      # .gpu_bundle/, shards built here (Ray)
    python bench/gpu_bundle.py --data out/data      # reuse a `kiln data` output
    bash .gpu_bundle/run.sh --extra gpt2_124m_float8 --budget 500   # on the GPU host
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit  # noqa: E402

# What `kiln train` and `kiln plan` import that a CUDA image's Python lacks; the rest (torch,
# numpy, PyYAML, sentencepiece for the run's closing sample) such images ship, and `run.sh`
# checks each by name before it starts.
DISTRIBUTIONS = ["hydra-core", "omegaconf", "antlr4-python3-runtime"]
OPTIONAL = ["torchao"]  # the FP8 extras (engine.float8)
CHECKED_IMPORTS = ["torch", "numpy", "yaml", "sentencepiece", "hydra", "omegaconf"]
CARRY_LIMIT_BYTES = 64 * 2**20  # what a device session carries with the working tree
SMOKE_DATA = ["corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=1000"]

RUN_SH = """#!/bin/bash
# bench/gpu.py on a GPU host with only PyTorch, from the bundle bench/gpu_bundle.py wrote.
# Arguments go to bench/gpu.py; results, log and traces go to $OUT (default bench/results).
set -o pipefail
BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${KILN_REPO:-$(cd "$BUNDLE/.." && pwd)}
OUT=${OUT:-$REPO/bench/results}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$BUNDLE/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi -L
# every module looked up in one interpreter, none imported (importing torch takes seconds)
"$PYTHON" -c '
import importlib.util, sys
missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
for name in missing:
    print(f"run.sh: Python module {name!r} is missing on this host ({sys.executable})",
          file=sys.stderr)
sys.exit(2 if missing else 0)' %(imports)s || exit 2
cd "$REPO" && "$PYTHON" bench/gpu.py --data "$BUNDLE/data" --results "$OUT/gpu.json" \\
  --traces "$OUT/traces" "$@" 2>&1 | tee "$OUT/gpu.log"
"""


def copy_distribution(name: str, site: Path) -> dict[str, object]:
    """Copy an installed distribution's files (its metadata included, bytecode and scripts
    outside site-packages left out) into `site`."""
    dist = importlib.metadata.distribution(name)
    root = Path(dist.locate_file(""))
    copied = 0
    for file in dist.files or []:
        relative = Path(str(file))
        if relative.parts[0] == ".." or "__pycache__" in relative.parts:
            continue
        source = root / relative
        if not source.is_file():
            continue
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += source.stat().st_size
    return {"version": dist.version, "bytes": copied}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_data(out: Path, source: Path | None, smoke: bool) -> dict[str, object]:
    if source is not None:
        shutil.copytree(source, out)
        return {"source": str(source)}
    command = [sys.executable, "-m", "launch.cli", "data", f"output_dir={out}", "overwrite=true",
               *(SMOKE_DATA if smoke else [])]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`kiln data` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"source": "kiln data" + (" " + " ".join(SMOKE_DATA) if smoke else "")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".gpu_bundle", help="the bundle directory")
    p.add_argument("--data", type=Path, help="a `kiln data` output to copy (default: build one)")
    p.add_argument("--no-torchao", action="store_true", help="leave torchao (FP8) out")
    p.add_argument("--smoke", action="store_true", help="tiny shards (the CPU test)")
    args = p.parse_args(argv)
    if args.data is not None and not (args.data / "manifest.json").is_file():
        p.error(f"--data {args.data}: no manifest.json there (not a `kiln data` output)")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    site = out / "site"
    site.mkdir(parents=True)
    packages = {}
    for name in DISTRIBUTIONS + ([] if args.no_torchao else OPTIONAL):
        try:
            packages[name] = copy_distribution(name, site)
        except importlib.metadata.PackageNotFoundError:
            if name in OPTIONAL:
                print(f"[bundle] {name} is not installed here: the FP8 extras will not run")
                continue
            raise SystemExit(f"{name} is not installed here: run `make install` first") from None
    data = build_data(out / "data", args.data, args.smoke)
    imports = CHECKED_IMPORTS + (["torchao"] if "torchao" in packages else [])
    run_sh = out / "run.sh"
    run_sh.write_text(RUN_SH % {"imports": " ".join(imports)})
    run_sh.chmod(0o755)
    summary = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "packages": packages,
        "data": {**data, "bytes": tree_bytes(out / "data")},
        "bytes": tree_bytes(out),
    }
    (out / "bundle.json").write_text(json.dumps(summary, indent=1) + "\n")
    versions = ", ".join(f"{name} {info['version']}" for name, info in packages.items())
    shards = summary["data"]["bytes"] / 2**20
    print(
        f"[bundle] {out}: {summary['bytes'] / 2**20:.1f} MiB ({versions}; shards {shards:.1f} MiB)"
    )
    if summary["bytes"] > CARRY_LIMIT_BYTES:
        print(f"[bundle] note: over the {CARRY_LIMIT_BYTES // 2**20} MiB a device session "
              "carries; --no-torchao or smaller shards")  # fmt: skip
    shown = run_sh.relative_to(REPO) if run_sh.is_relative_to(REPO) else run_sh
    print(f"[bundle] on the GPU host: bash {shown} [bench/gpu.py arguments]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
