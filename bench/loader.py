"""Benchmark the trainer's data loader against plain `np.memmap` slicing of the same tokens.

One run, one corpus, one machine:

1. Builds the Python standard library corpus with `kiln data` (a subprocess; `--data DIR`
   reuses a built directory instead) and writes its training tokens once more as one flat
   file: every document of the train shards, each followed by EOS, concatenated (uint16 when
   the vocabulary fits). The loader's stream (epoch 0) and the flat file must hold the same
   tokens (same count, same histogram), or the run stops.
2. Baseline, in the main process: nanoGPT's `get_batch` over `np.memmap(flat)`, `micro_batch`
   random offsets, `torch.stack` of the `seq_len + 1` windows as int64, split into inputs and
   labels, each (micro_batch, seq_len) and contiguous.
3. Loader: `build_run_loader` (causal LM objective, `data.shuffle_buffer=1024`,
   `data.document_masking=true`, so every micro-batch also holds labels, position ids and
   document ids, as the trainer gets them) at `data.num_workers` 0, 1 and 2, iterating the
   DataLoader in the main process. The first `--warmup` micro-batches (worker start-up, the
   prefetch queue filling) are not timed; start-up (build + first micro-batch) is reported
   apart.
4. Diagnostic (no target): the same torch DataLoader settings over a dataset that only clones
   a prebuilt micro-batch of the same keys and shapes, at 1 and 2 workers: the most any
   dataset can deliver through the DataLoader's worker processes on this machine.

Shapes: micro-batch 8 x seq 1024 (the typical decoder) and 32 x 128 (short sequences); tokens/s
= input tokens delivered per second. Each measurement takes `--tokens` input tokens (default
about one pass over the corpus); `--repeat R` runs R interleaved rounds and keeps each figure's
best round. The target of issue #5 (loader >= 0.5x the baseline) is checked for the loader in
the baseline's own process (num_workers=0) at 8 x 1024; every other ratio, workers included, is
reported without a target.

Prints a table, writes bench/results/loader.json and replaces its section of BENCHMARKS.md
(`--smoke`: a tiny corpus, 4 x 64, a few micro-batches, prints only). A missed target prints
FAIL but the exit code stays 0 (non-zero only on a crash). A cProfile of the loader at
num_workers=0 (headline shape: where its time goes) is added when the target is missed, or
always with `--profile`.

    .venv/bin/python bench/loader.py [--data DIR] [--tokens T] [--repeat R] [--smoke] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Run as a script, Python puts bench/ first on sys.path, where bench/data_pipeline.py would
# shadow the `data_pipeline` package: drop bench/ and put the repository first.
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import best, git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "loader"
START_MARK, END_MARK = marks(SECTION)
TARGET_VS_BASELINE = 0.5  # issue #9: loader tokens/s >= 0.5 x np.memmap slicing
# (micro_batch, seq_len, num_workers) the target applies to: the loader in the same process as
# the baseline, which is how a causal-LM run reads (the objective is a few numpy ops); worker
# processes pay for moving tensors between processes and are reported beside it
HEADLINE = (8, 1024, 0)
SHAPES = [(8, 1024), (32, 128)]  # (micro_batch, seq_len)
SMOKE_SHAPES = [(4, 64)]
SHUFFLE_BUFFER = 1024
DEFAULT_TOKENS = 1 << 22  # input tokens per measurement: about one pass over the stdlib corpus
SMOKE_DATA = ["corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=1000"]
KEYS = ("input_ids", "labels", "position_ids", "document_ids")


# --------------------------------------------------------------------------------------------
# corpus


def build_data(out: Path, smoke: bool) -> float:
    """`kiln data output_dir=out` (the stdlib corpus) in a subprocess; returns its wall time."""
    overrides = [f"output_dir={out}", "overwrite=true", *(SMOKE_DATA if smoke else [])]
    log_path = out.parent / "kiln-data.log"
    print(f"  kiln data {' '.join(overrides)} ...", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "launch.cli", "data", *overrides],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if code != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"kiln data exited with {code}; log {log_path}:\n{tail}")
    return time.perf_counter() - start


def write_flat(data_dir: Path, flat: Path) -> dict[str, Any]:
    """The train shards' documents, each followed by EOS, as one flat token file."""
    from data_pipeline.shards import iter_documents, read_manifest

    manifest = read_manifest(data_dir)
    eos = manifest.tokenizer.special_ids["eos"]
    dtype = np.uint16 if manifest.tokenizer.vocab_size <= 1 << 16 else np.uint32
    shards = [record for record in manifest.shards if record.split == "train"]
    tokens = documents = 0
    end = np.array([eos], dtype=dtype)
    with open(flat, "wb") as out:
        for record in shards:
            for document in iter_documents(data_dir / record.path):
                out.write(document.astype(dtype).tobytes())
                out.write(end.tobytes())
                tokens += document.size
                documents += 1
    return {
        "data_dir": str(data_dir),
        "shards": len(shards),
        "documents": documents,
        "tokens": tokens,
        "stream_tokens": tokens + documents,  # with one EOS per document
        "vocab_size": manifest.tokenizer.vocab_size,
        "eos": eos,
        "flat_dtype": np.dtype(dtype).name,
        "flat_mb": flat.stat().st_size / 1e6,
    }


def loader_config(data_dir: Path, vocab: int, micro: int, seq_len: int, workers: int) -> Any:
    from pretrain.config import CausalLMConfig, DataConfig, DecoderConfig

    data = DataConfig(
        path=str(data_dir),
        seq_len=seq_len,
        micro_batch_size=micro,
        shuffle_buffer=SHUFFLE_BUFFER,
        num_workers=workers,
        document_masking=True,
    )
    return SimpleNamespace(
        data=data, model=DecoderConfig(vocab_size=vocab), objective=CausalLMConfig()
    )


def check_same_tokens(data_dir: Path, flat: Path, dtype: str, vocab: int) -> bool:
    """The loader's streams over one epoch hold the flat file's tokens (count, histogram)."""
    from pretrain.data.loader import build_run_loader

    loader = build_run_loader(loader_config(data_dir, vocab, 1, 64, 0))
    flat_tokens = np.fromfile(flat, dtype=np.dtype(dtype))
    streams = [s.read(0, s.epoch_length) for s in loader.dataset.streams()]
    stream = np.concatenate(streams)
    if stream.size != flat_tokens.size:
        return False
    size = max(int(stream.max()), int(flat_tokens.max())) + 1
    return bool(
        np.array_equal(
            np.bincount(stream, minlength=size), np.bincount(flat_tokens, minlength=size)
        )
    )


# --------------------------------------------------------------------------------------------
# measurements


def timed(
    make: Any, micro: int, seq_len: int, batches: int, warmup: int, keys: tuple[str, ...]
) -> dict[str, Any]:
    """Start-up (make() + first batch), then the steady rate over `batches` batches taken after
    the first `warmup`. `make()` returns an iterator of batches, each holding `keys` as
    (micro, seq_len) int64 tensors (checked on the first)."""
    start = time.perf_counter()
    iterator = make()
    batch = next(iterator)
    startup = time.perf_counter() - start
    for key in keys:
        value = batch.get(key)
        if value is None or tuple(value.shape) != (micro, seq_len) or value.dtype != torch.int64:
            got = "missing" if value is None else f"{tuple(value.shape)} {value.dtype}"
            raise RuntimeError(f"{key}: expected ({micro}, {seq_len}) int64, got {got}")
    for _ in range(warmup - 1):
        next(iterator)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        tokens += next(iterator)["input_ids"].numel()
    seconds = time.perf_counter() - start
    # a DataLoader iterator shuts its workers down when the last reference to it goes
    del iterator, batch
    return {
        "startup_seconds": startup,
        "batches": batches,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ms_per_batch": 1e3 * seconds / batches,
    }


def run_baseline(
    flat: Path, dtype: str, micro: int, seq_len: int, batches: int, warmup: int, seed: int
) -> dict[str, Any]:
    """nanoGPT's get_batch: random windows of a memory-mapped token file, in this process."""

    def make() -> Any:
        data = np.memmap(flat, dtype=np.dtype(dtype), mode="r")
        rng = np.random.default_rng(seed)
        high = len(data) - seq_len  # offsets in [0, len - seq_len - 1]

        def batches_() -> Any:
            while True:
                offsets = rng.integers(0, high, size=micro).tolist()
                rows = torch.stack(
                    [torch.from_numpy(data[i : i + seq_len + 1].astype(np.int64)) for i in offsets]
                )
                yield {
                    "input_ids": rows[:, :-1].contiguous(),
                    "labels": rows[:, 1:].contiguous(),
                }

        return batches_()

    return timed(make, micro, seq_len, batches, warmup, ("input_ids", "labels"))


def run_loader(
    data_dir: Path, vocab: int, micro: int, seq_len: int, workers: int, batches: int, warmup: int
) -> dict[str, Any]:
    from pretrain.data.loader import build_run_loader

    def make() -> Any:
        return iter(
            build_run_loader(loader_config(data_dir, vocab, micro, seq_len, workers)).loader
        )

    return timed(make, micro, seq_len, batches, warmup, KEYS)


class _Clones(torch.utils.data.IterableDataset):
    """A prebuilt micro-batch, cloned forever: the DataLoader's own cost, with no reading."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.batch = batch

    def __iter__(self) -> Any:
        while True:
            yield {key: value.clone() for key, value in self.batch.items()}


def run_floor(
    data_dir: Path, vocab: int, micro: int, seq_len: int, workers: int, batches: int, warmup: int
) -> dict[str, Any]:
    """The loader's DataLoader settings over `_Clones` of one of its micro-batches."""
    from pretrain.data.loader import build_run_loader

    loader = build_run_loader(loader_config(data_dir, vocab, micro, seq_len, 0))
    sample = next(iter(loader.loader))
    settings = loader.loader.dataloader

    def make() -> Any:
        dataloader = torch.utils.data.DataLoader(
            _Clones(sample),
            batch_size=None,
            num_workers=workers,
            pin_memory=settings.pin_memory,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
            multiprocessing_context=settings.multiprocessing_context,
        )
        return iter(dataloader)

    return timed(make, micro, seq_len, batches, warmup, KEYS)


# prefixes cut from file names in the profile: site-packages, the stdlib, the repository
PATH_ROOTS = [
    str(Path(np.__file__).parent.parent) + os.sep,
    os.path.dirname(os.__file__) + os.sep,
    str(REPO) + os.sep,
]


# functions whose cumulative time the profile breaks down (file relative to the repository)
PROFILE_PARTS = {
    ("pretrain/data/loader.py", "micro_batch"): "dataset",
    ("pretrain/objectives.py", "batch"): "objective",
    ("pretrain/data/shard_reader.py", "read"): "read",
    ("pretrain/data/order.py", "lookup"): "lookup",
}


def profile_loader(
    data_dir: Path, vocab: int, micro: int, seq_len: int, batches: int, top: int = 15
) -> dict[str, Any]:
    """cProfile of `batches` micro-batches of the loader at num_workers=0 (after one)."""
    from pretrain.data.loader import build_run_loader

    loader = build_run_loader(loader_config(data_dir, vocab, micro, seq_len, 0))
    iterator = iter(loader.loader)
    next(iterator)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(batches):
        next(iterator)
    profiler.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = []
    cumulative_of: dict[str, float] = dict.fromkeys(PROFILE_PARTS.values(), 0.0)
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename
        for root in PATH_ROOTS:
            where = where.replace(root, "")
        part = PROFILE_PARTS.get((where, name))
        if part is not None:
            cumulative_of[part] += cumulative
        rows.append(
            {
                "function": f"{where}:{line}({name})" if line else name,
                "calls": calls,
                "own_seconds": own,
                "cumulative_seconds": cumulative,
            }
        )
    rows.sort(key=lambda row: row["own_seconds"], reverse=True)
    dataset = cumulative_of["dataset"]
    reading = cumulative_of["read"] + cumulative_of["lookup"]
    breakdown = {
        "reading (global order lookup, stream reads)": reading,
        "objective (labels, position ids, document ids)": cumulative_of["objective"],
        "rest of micro_batch (int64 token array, EOS cumsum, tensors)": (
            dataset - reading - cumulative_of["objective"]
        ),
        "DataLoader (fetch, conversion, profiling hooks)": seconds - dataset,
    }
    return {
        "micro_batch": micro,
        "seq_len": seq_len,
        "batches": batches,
        "seconds": seconds,
        "ms_per_batch": 1e3 * seconds / batches,
        "breakdown_seconds": breakdown,
        "top_own_time": rows[:top],
    }


# --------------------------------------------------------------------------------------------
# report


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:.2f} M tokens/s"


def workers_name(workers: str) -> str:
    return "1 worker" if workers == "1" else f"{workers} workers"


def shape_name(shape: dict[str, Any]) -> str:
    return f"{shape['micro_batch']} x {shape['seq_len']}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [("micro x seq", "run", "M tokens/s", "/ baseline", "ms / batch", "start-up ms")]
    for shape in results["shapes"]:
        base = shape["baseline"]["tokens_per_s"]
        runs = [("np.memmap baseline (main process)", shape["baseline"])]
        runs += [(f"loader, num_workers={w}", run) for w, run in shape["loader"].items()]
        runs += [(f"DataLoader floor, {workers_name(w)}", run) for w, run in shape["floor"].items()]
        for label, run in runs:
            rows.append(
                (
                    shape_name(shape),
                    label,
                    f"{run['tokens_per_s'] / 1e6:.2f}",
                    f"{run['tokens_per_s'] / base:.3f}x",
                    f"{run['ms_per_batch']:.3f}",
                    f"{1e3 * run['startup_seconds']:.0f}",
                )
            )
    return rows


def check_line(item: dict[str, Any]) -> str:
    if item["value"] is None:
        return f"{item['name']}: not measured, target >= {item['target']:.2f}x"
    verdict = "PASS" if item["pass"] else "FAIL"
    return f"{item['name']}: {item['value']:.3f}x, target >= {item['target']:.2f}x: {verdict}"


def measurement_lines(results: dict[str, Any]) -> list[str]:
    """The ratios (the headline's check first) and where the time goes."""
    lines = [check_line(item) for item in results["checks"]]
    for shape in results["shapes"]:
        for workers, ratio in shape["ratios"].items():
            if (shape["micro_batch"], shape["seq_len"], int(workers)) == HEADLINE:
                continue
            lines.append(
                f"loader / baseline, num_workers={workers}, {shape_name(shape)}: "
                f"{ratio:.3f}x (no target)"
            )
    for shape in results["shapes"]:
        base, loader = shape["baseline"], shape["loader"]
        parts = [
            f"{shape_name(shape)}: the baseline takes {base['ms_per_batch']:.3f} ms per micro-batch"
        ]
        if "0" in loader:
            parts.append(
                f"the loader's own work (num_workers=0, reading the shards, the objective's "
                f"labels, positions and document ids) {loader['0']['ms_per_batch']:.3f} ms"
            )
        for workers, floor in shape["floor"].items():
            line = (
                f"the DataLoader alone moves at most {fmt_rate(floor['tokens_per_s'])} through "
                f"{workers_name(workers)} ({floor['ms_per_batch']:.3f} ms per micro-batch)"
            )
            if workers in loader:
                share = loader[workers]["tokens_per_s"] / floor["tokens_per_s"]
                line += f", and the loader at num_workers={workers} reaches {share:.0%} of that"
            ratio = floor["tokens_per_s"] / base["tokens_per_s"]
            if (shape["micro_batch"], shape["seq_len"], int(workers)) == HEADLINE:
                line += f"; that floor is itself {ratio:.3f}x the baseline, " + (
                    "under the target: no dataset meets it while micro-batches cross "
                    "processes through the DataLoader as they do now"
                    if ratio < TARGET_VS_BASELINE
                    else "so the target is within the DataLoader's reach"
                )
            parts.append(line)
        lines.append("; ".join(parts))
    profile = results.get("profile")
    if profile:
        total = profile["seconds"]
        parts = ", ".join(
            f"{part} {seconds / total:.0%}"
            for part, seconds in profile["breakdown_seconds"].items()
        )
        top = ", ".join(
            f"`{row['function']}` {row['own_seconds'] / total:.0%}"
            for row in profile["top_own_time"][:5]
        )
        lines.append(
            f"cProfile of the loader at num_workers=0, {profile['micro_batch']} x "
            f"{profile['seq_len']}, {profile['batches']} micro-batches "
            f"({profile['ms_per_batch']:.3f} ms each under the profiler): {parts}; most own "
            f"time: {top}"
        )
    return lines


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for line in measurement_lines(results):
        print(line)
    if results.get("profile"):
        print("\ncProfile, own time (top functions):")
        for row in results["profile"]["top_own_time"]:
            print(
                f"  {1e3 * row['own_seconds']:9.1f} ms own  "
                f"{1e3 * row['cumulative_seconds']:9.1f} ms cum  {row['calls']:>8}  "
                f"{row['function']}"
            )


def markdown_section(results: dict[str, Any]) -> str:
    m, corpus = results["machine"], results["corpus"]
    ram = f"{m['ram_gib']} GiB RAM" if m["ram_gib"] is not None else "RAM unknown"
    of = f"best of {results['repeat']} interleaved rounds" if results["repeat"] > 1 else "1 round"
    body = [
        START_MARK,
        "## Loader: shards -> micro-batches vs `np.memmap` slicing",
        "",
        f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
        f"{results['runtime_seconds']:.0f} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {ram}, "
        f"{m['os']}; Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}; load "
        f"average before the run {', '.join(str(x) for x in m['load_average_before'])}.",
        f"- Corpus: {corpus['description']}: {corpus['documents']:,} train documents, "
        f"{corpus['tokens']:,} tokens ({corpus['stream_tokens']:,} with one EOS per document; "
        f"vocabulary {corpus['vocab_size']}, {corpus['shards']} train shard(s)); the flat "
        f"baseline file holds the same tokens "
        f"({'identical count and histogram' if corpus['tokens_match'] else 'DIFFERENT'}).",
        "- Baseline: nanoGPT's `get_batch` in the main process: random offsets into "
        f"`np.memmap` of the flat {corpus['flat_dtype']} file, `torch.stack` of the "
        "`seq_len + 1` windows as int64, inputs and labels (contiguous). Loader: "
        "`build_run_loader`, causal LM, `data.shuffle_buffer=1024`, "
        "`data.document_masking=true` (input ids, labels, position ids, document ids per "
        "micro-batch), iterated in the main process. Tokens/s = input tokens delivered per "
        f"second over {results['tokens_per_measurement']:,} tokens per measurement, after "
        f"{results['warmup']} untimed micro-batches; {of}. Start-up = building the loader "
        "(or opening the memmap) and the first micro-batch. DataLoader floor = the same "
        "DataLoader settings over a dataset that only clones a prebuilt micro-batch of the "
        "same keys and shapes.",
        "",
    ]
    rows = table_rows(results)
    body.append("| " + " | ".join(rows[0]) + " |")
    body.append("|" + "|".join("---" for _ in rows[0]) + "|")
    body += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    body.append("")
    body += [f"- {line}" for line in measurement_lines(results)]
    body += ["", END_MARK]
    return "\n".join(body) + "\n"


def summarize(
    args: argparse.Namespace,
    info: dict[str, Any],
    corpus: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
    shapes: list[tuple[int, int]],
    workers: list[int],
    batches: dict[tuple[int, int], int],
) -> dict[str, Any]:
    shape_results = []
    checks = []
    for micro, seq_len in shapes:
        key = f"{micro}x{seq_len}"
        baseline = best(runs[f"{key}/baseline"])
        loader = {str(w): best(runs[f"{key}/loader{w}"]) for w in workers}
        floor = {str(w): best(runs[f"{key}/floor{w}"]) for w in workers if w}
        ratios = {w: run["tokens_per_s"] / baseline["tokens_per_s"] for w, run in loader.items()}
        shape_results.append(
            {
                "micro_batch": micro,
                "seq_len": seq_len,
                "batches": batches[(micro, seq_len)],
                "baseline": baseline,
                "loader": loader,
                "floor": floor,
                "ratios": ratios,
            }
        )
        if (micro, seq_len) == HEADLINE[:2]:
            value = ratios.get(str(HEADLINE[2]))
            checks.append(
                {
                    "name": (
                        f"loader / baseline, num_workers={HEADLINE[2]}, {micro} x {seq_len} "
                        "(same process as the baseline; the target applies to this line only)"
                    ),
                    "value": value,
                    "target": TARGET_VS_BASELINE,
                    "pass": None if value is None else value >= TARGET_VS_BASELINE,
                }
            )
    command = f"bench/loader.py --repeat {args.repeat}"
    command += f" --tokens {args.tokens}" if args.tokens != DEFAULT_TOKENS else ""
    command += " --data DIR" if args.data else ""
    command += " --smoke" if args.smoke else ""
    command += " --profile" if args.profile else ""
    return {
        "benchmark": SECTION,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "command": command,
        "smoke": args.smoke,
        "repeat": args.repeat,
        "tokens_per_measurement": args.tokens,
        "warmup": args.warmup,
        "workers": workers,
        "machine": info,
        "corpus": corpus,
        "shapes": shape_results,
        "checks": checks,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------
# main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `kiln data` output directory to reuse")
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"input tokens per measurement (default {DEFAULT_TOKENS}, about one corpus pass)",
    )
    p.add_argument("--warmup", type=int, default=16, help="untimed micro-batches (default 16)")
    p.add_argument(
        "--repeat", type=int, default=3, help="interleaved rounds, best of them (default 3)"
    )
    p.add_argument("--workers", default="0,1,2", help="data.num_workers values (default 0,1,2)")
    p.add_argument("--smoke", action="store_true", help="tiny corpus and run; print only")
    p.add_argument("--profile", action="store_true", help="cProfile the loader, 0 workers")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file to update")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results" / "loader.json",
        help="raw figures (JSON)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    workers = sorted({int(w) for w in args.workers.split(",")})
    if args.smoke:
        args.tokens, args.warmup, args.repeat = 6 * 4 * 64, 2, 1
    if min(args.tokens, args.warmup, args.repeat) < 1 or min(workers) < 0:
        p.error("--tokens, --warmup and --repeat must be at least 1, --workers at least 0")
    started = time.perf_counter()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    info = machine(("torch", "numpy"))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-loader-"))
    print(f"bench loader: shapes {shapes}, num_workers {workers}, in {work}")
    try:
        build_seconds = None
        if args.data:
            data_dir = args.data.resolve()
        else:
            data_dir = work / "data"
            build_seconds = build_data(data_dir, args.smoke)
        flat = work / "train.bin"
        corpus = write_flat(data_dir, flat)
        corpus["built_seconds"] = build_seconds
        vocab, dtype = corpus["vocab_size"], corpus["flat_dtype"]
        corpus["tokens_match"] = check_same_tokens(data_dir, flat, dtype, vocab)
        source = "`--data`" if args.data else "`kiln data`"
        corpus["description"] = (
            f"the Python stdlib{'/json' if args.smoke else ''} built by {source}"
        )
        if not corpus["tokens_match"]:
            raise RuntimeError(f"the loader's stream and {flat} hold different tokens")
        print(
            f"  corpus: {corpus['documents']:,} documents, {corpus['tokens']:,} tokens "
            f"({corpus['stream_tokens']:,} with EOS), vocabulary {corpus['vocab_size']}; "
            "flat file matches the loader's stream",
            flush=True,
        )
        batches = {
            (micro, seq_len): max(1, args.tokens // (micro * seq_len)) for micro, seq_len in shapes
        }
        runs: dict[str, list[dict[str, Any]]] = {}
        # Rounds interleave every kind of run, so that a burst of load from elsewhere hits one
        # round, not one kind of run; each figure is the best round's.
        for round_ in range(args.repeat):
            print(f"  round {round_ + 1}/{args.repeat} ...", flush=True)
            for micro, seq_len in shapes:
                key, n = f"{micro}x{seq_len}", batches[(micro, seq_len)]
                shape = (micro, seq_len)
                measure: list[tuple[str, Any, tuple[Any, ...]]] = [
                    ("baseline", run_baseline, (flat, dtype, *shape, n, args.warmup, round_))
                ]
                for w in workers:
                    where = (data_dir, vocab, *shape, w, n, args.warmup)
                    measure.append((f"loader{w}", run_loader, where))
                    if w:
                        measure.append((f"floor{w}", run_floor, where))
                for name, function, arguments in measure:
                    result = function(*arguments)
                    runs.setdefault(f"{key}/{name}", []).append(result)
                    print(
                        f"    {micro} x {seq_len} {name}: {fmt_rate(result['tokens_per_s'])}",
                        flush=True,
                    )
        results = summarize(args, info, corpus, runs, shapes, workers, batches)
        headline_failed = any(check["pass"] is False for check in results["checks"])
        if args.profile or headline_failed:  # cheap: a second or so
            micro, seq_len = HEADLINE[:2] if HEADLINE[:2] in shapes else shapes[0]
            results["profile"] = profile_loader(
                data_dir, vocab, micro, seq_len, batches[(micro, seq_len)]
            )
        results["runtime_seconds"] = time.perf_counter() - started
        print()
        print_table(results)
        print(f"\nruntime {results['runtime_seconds']:.0f} s")
        if args.smoke:
            print("smoke run: BENCHMARKS.md and bench/results left as they are")
        else:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            write_markdown(args.markdown, markdown_section(results), SECTION)
            print(f"wrote {args.results} and the {SECTION} section of {args.markdown}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
