"""Benchmark `kiln data`'s tokenize and shard stages against a plain SentencePiece pool.

One run, one corpus, one machine:

1. Writes the Python standard library (what `corpus=stdlib` reads) as jsonl, `--scale` copies
   of it, and a second set of copies for the "double" corpus (each document again, with a
   one-line comment appended). Dedup is off in every build, so the copies all survive.
2. Builds the corpus with `kiln data` (a subprocess, a local Ray sized to the workers):
   once to train the tokenizer, then with `tokenizer.path=` at N workers and at 1 worker, and
   the double corpus at N workers. Pipeline throughput = tokens / (tokenize s + shard s),
   from each build's report.json.
3. Baseline: `multiprocessing.Pool` of N (then 1) processes, each with the same tokenizer
   model, encoding the same normalized and filtered documents with `num_threads=1` and
   writing nothing; tokens/s = tokens / wall time of the map.
4. Memory: worker peak RSS (and the tokenize stage's) of the double corpus over the single.

Prints a table, writes bench/results/data_pipeline.json and replaces its section of
BENCHMARKS.md (`--smoke`: a tiny corpus, prints only). Targets are ratios measured in the same
run; a missed target prints FAIL but the exit code stays 0 (non-zero only on a crash).

    .venv/bin/python bench/data_pipeline.py [--scale K] [--workers N] [--repeat R] [--smoke] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Run as a script, Python puts bench/ first on sys.path, where this file would shadow the
# `data_pipeline` package: drop bench/ and put the repository first.
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import best, git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "data_pipeline"
START_MARK, END_MARK = marks(SECTION)
# Targets of issue #9.
TARGET_VS_BASELINE = 0.85  # pipeline tokens/s >= 0.85 x the SentencePiece pool's
TARGET_SCALING = 1.7  # pipeline at N (2) workers >= 1.7 x pipeline at 1 worker
TARGET_MEMORY = 1.10  # worker peak RSS on the double corpus <= 1.10 x on the single
BASELINE_TASK_CHARS = 256 << 10  # text per baseline task (and encode call)
SMOKE_VOCAB = 1000  # the smoke corpus (stdlib/json, 48 KB) is too small for 4096 pieces


# --------------------------------------------------------------------------------------------
# corpus


@dataclass
class Corpus:
    directory: Path
    base: str  # the stdlib part it copies ("stdlib", "stdlib/json")
    copies: list[Path] = field(default_factory=list)  # one jsonl per copy of the base
    documents: int = 0  # per copy
    bytes: int = 0  # UTF-8 text per copy

    def files(self, n_copies: int) -> list[Path]:
        return self.copies[:n_copies]


def write_corpus(directory: Path, base: str, n_copies: int) -> Corpus:
    """`n_copies` jsonl files, each the whole base; copy j > 0 appends a comment `# copy j`."""
    from data_pipeline.sources import expand_paths
    from pretrain.config import SourceConfig

    texts = []
    for path in sorted(expand_paths(SourceConfig(name="stdlib", paths=[base], format="stdlib"))):
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():  # empty files (`__init__.py`) would only be counted as skipped
            texts.append(text)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(directory, base, documents=len(texts))
    corpus.bytes = sum(len(t.encode("utf-8")) for t in texts)
    for copy in range(n_copies):
        path = directory / f"copy-{copy:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for text in texts:
                if copy:
                    text = f"{text}\n# copy {copy}\n"
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        corpus.copies.append(path)
    return corpus


# --------------------------------------------------------------------------------------------
# pipeline builds


def corpus_overrides(files: list[Path]) -> list[str]:
    paths = ",".join(json.dumps(str(path)) for path in files)
    return [
        "corpus=files",
        f"corpus.sources.0.paths=[{paths}]",
        "corpus.sources.0.text_field=text",
        "dedup.exact=false",
        "dedup.near=false",
    ]


def run_build(
    name: str, work: Path, files: list[Path], workers: int, extra: list[str]
) -> dict[str, Any]:
    """One `kiln data` run in a subprocess; returns the figures taken from its report.json."""
    out = work / f"build-{name}"
    overrides = [
        f"output_dir={out}",
        *corpus_overrides(files),
        f"ray.workers={workers}",
        f"ray.num_cpus={workers}",
        "overwrite=true",
        *extra,
    ]
    log_path = work / f"build-{name}.log"
    print(f"  build {name}: {workers} worker(s), {len(files)} x corpus ...", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "launch.cli", "data", *overrides],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"kiln data ({name}) exited with {code}; log {log_path}:\n{tail}")
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    tokens = int(stages["tokenize"]["tokens"])
    seconds = stages["tokenize"]["seconds"] + stages["shard"]["seconds"]
    documents = sum(sum(s["documents_out"].values()) for s in report["sources"].values())
    return {
        "name": name,
        "copies": len(files),
        "workers": report["workers"],
        "documents": documents,
        "tokens": tokens,
        "tokenize_seconds": stages["tokenize"]["seconds"],
        "shard_seconds": stages["shard"]["seconds"],
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "tokenize_units": stages["tokenize"]["done"],
        "tokenize_task_seconds": stages["tokenize"]["task_seconds"],
        "shards": stages["shard"]["done"],
        "shard_task_seconds": stages["shard"]["task_seconds"],
        "shard_mb": stages["shard"].get("bytes", 0) / 1e6,
        "scan_seconds": stages["scan"]["seconds"],
        "tokenizer_seconds": stages["tokenizer"]["seconds"],
        "worker_peak_rss_mib": report["worker_peak_rss_mib"],
        "tokenize_peak_rss_mib": stages["tokenize"]["peak_rss_mib"],
        "shard_peak_rss_mib": stages["shard"]["peak_rss_mib"],
        "peak_rss_mib_by_stage": {k: v.get("peak_rss_mib") for k, v in stages.items()},
        "report_wall_seconds": report["wall_seconds"],
        "process_wall_seconds": wall,
        "output_dir": str(out),
    }


# --------------------------------------------------------------------------------------------
# baseline: a plain SentencePiece pool


_WORKER: dict[str, Any] = {}


def load_documents(files: list[Path], normalize_cfg: Any, filter_cfg: Any) -> list[str]:
    """The texts the pipeline tokenizes: each jsonl record's text, normalized, if it passes
    the filters (dedup is off in the benchmark builds)."""
    from data_pipeline.filters import apply_filters, normalize

    texts = []
    for path in files:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                text = normalize(json.loads(line)["text"], normalize_cfg)
                if apply_filters(text, filter_cfg) is None:
                    texts.append(text)
    return texts


def _baseline_init(model: str, barrier: Any, loader: tuple[Any, ...] | None) -> None:
    import sentencepiece as spm

    _WORKER["processor"] = spm.SentencePieceProcessor(model_file=model)
    if "texts" not in _WORKER:  # not inherited through fork: read them here
        assert loader is not None
        _WORKER["texts"] = load_documents(*loader)
    barrier.wait()  # the clock starts once every process is ready


def _baseline_encode(span: tuple[int, int]) -> int:
    texts = _WORKER["texts"][span[0] : span[1]]
    encoded = _WORKER["processor"].encode(texts, out_type=int, num_threads=1)
    return sum(len(ids) for ids in encoded)


def task_spans(texts: list[str], chars: int = BASELINE_TASK_CHARS) -> list[tuple[int, int]]:
    spans, start, size = [], 0, 0
    for index, text in enumerate(texts):
        size += len(text)
        if size >= chars:
            spans.append((start, index + 1))
            start, size = index + 1, 0
    if start < len(texts):
        spans.append((start, len(texts)))
    return spans


def run_baseline(
    model: Path, texts: list[str], processes: int, loader: tuple[Any, ...]
) -> dict[str, Any]:
    """Encode `texts` in a pool of `processes`; time the map only (not start-up)."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    forked = context.get_start_method() == "fork"
    spans = task_spans(texts)
    barrier = context.Barrier(processes + 1)
    print(f"  baseline: {processes} process(es), {len(spans)} tasks ...", flush=True)
    if forked:
        _WORKER["texts"] = texts  # inherited by the forked workers, never pickled
    try:
        with context.Pool(
            processes, _baseline_init, (str(model), barrier, None if forked else loader)
        ) as pool:
            barrier.wait()
            start = time.perf_counter()
            tokens = sum(pool.imap_unordered(_baseline_encode, spans))
            seconds = time.perf_counter() - start
    finally:
        _WORKER.pop("texts", None)
    return {
        "processes": processes,
        "documents": len(texts),
        "tasks": len(spans),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
    }


def compose_cfg(overrides: list[str]) -> Any:
    """The KilnConfig `kiln data` builds from these overrides (for normalize and filters)."""
    from hydra import compose, initialize_config_module

    from pretrain.config import build_config, register_configs

    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        return build_config(compose("data", overrides=overrides))


# --------------------------------------------------------------------------------------------
# machine and report


def check(name: str, value: float | None, target: float, at_least: bool) -> dict[str, Any]:
    if value is None:
        return {"name": name, "value": None, "target": target, "at_least": at_least, "pass": None}
    passed = value >= target if at_least else value <= target
    return {"name": name, "value": value, "target": target, "at_least": at_least, "pass": passed}


def check_line(item: dict[str, Any]) -> str:
    sign = ">=" if item["at_least"] else "<="
    if item["value"] is None:
        return f"{item['name']}: n/a (needs 2 or more workers), target {sign} {item['target']}x"
    verdict = "PASS" if item["pass"] else "FAIL"
    return f"{item['name']}: {item['value']:.2f}x, target {sign} {item['target']:.2f}x: {verdict}"


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:.3f} M tokens/s"


def measurement_lines(results: dict[str, Any]) -> list[str]:
    """One line per measured figure and per checked ratio (the same in stdout and markdown)."""
    n, info = results["workers"], results["info"]
    builds, base = results["builds"], results["baseline"]
    single, one, double = builds["single"], builds["single_1w"], builds["double"]
    of = f", best of {results['repeat']}" if results["repeat"] > 1 else ""
    lines = [
        f"pipeline, {n} worker(s): {fmt_rate(single['tokens_per_s'])} "
        f"(tokenize {single['tokenize_seconds']:.1f} s + shard {single['shard_seconds']:.1f} s, "
        f"{single['tokenize_units']} units, {single['shards']} shards{of})",
        f"pipeline, 1 worker: {fmt_rate(one['tokens_per_s'])} "
        f"(tokenize {one['tokenize_seconds']:.1f} s + shard {one['shard_seconds']:.1f} s{of})",
        f"pipeline, {n} worker(s), double corpus: {fmt_rate(double['tokens_per_s'])} "
        f"(tokenize {double['tokenize_seconds']:.1f} s + shard {double['shard_seconds']:.1f} s, "
        f"{double['tokenize_units']} units; run once, for memory)",
        f"baseline pool, {n} process(es): {fmt_rate(base['n']['tokens_per_s'])} "
        f"({base['n']['seconds']:.1f} s, {base['n']['tasks']} tasks{of})",
        f"baseline pool, 1 process: {fmt_rate(base['1']['tokens_per_s'])} "
        f"({base['1']['seconds']:.1f} s{of})",
        f"worker peak RSS: {single['worker_peak_rss_mib']:.0f} MiB (corpus), "
        f"{double['worker_peak_rss_mib']:.0f} MiB (double); tokenize stage "
        f"{single['tokenize_peak_rss_mib']:.0f} / {double['tokenize_peak_rss_mib']:.0f} MiB; "
        f"shard stage {single['shard_peak_rss_mib']:.0f} / "
        f"{double['shard_peak_rss_mib']:.0f} MiB",
        f"baseline {n} / 1 process(es): {info['baseline_scaling']:.2f}x "
        "(no target: how far this machine scales at all)",
    ]
    if info["pipeline_scaling_vs_baseline_scaling"] is not None:
        lines.append(
            f"pipeline scaling / baseline scaling: "
            f"{info['pipeline_scaling_vs_baseline_scaling']:.2f}x (no target)"
        )
    lines += [
        f"tokens, pipeline vs baseline: {single['tokens']:,} vs {base['n']['tokens']:,} "
        f"({'identical' if info['tokens_match'] else 'DIFFERENT'})",
        f"where the pipeline's time goes ({n} workers): the tokenize tasks did "
        f"{single['tokenize_task_seconds']:.1f} s of work, {info['task_work_vs_encode']:.2f}x "
        f"the 1-process baseline's {base['1']['seconds']:.1f} s of encoding; workers were busy "
        f"{info['tokenize_busy']:.0%} of the tokenize stage (the rest: Ray scheduling, the "
        f"last units); the shard stage is {info['shard_share']:.0%} of the measured time",
    ]
    if not info["machine_scales"]:
        lines.append(
            f"note: the baseline itself scaled only {info['baseline_scaling']:.2f}x on {n} "
            "processes, so this machine did not give the run all its cores (a shared or busy "
            "host): the multi-worker ratios below are unreliable; rerun with --repeat 3"
        )
    lines += [check_line(item) for item in results["checks"]]
    return lines


def print_table(results: dict[str, Any]) -> None:
    rows = [("run", "workers", "docs", "tokens", "seconds", "M tokens/s", "peak RSS MiB")]
    runs = results["runs"]
    for build in [*runs["single"], *runs["single_1w"], results["builds"]["double"]]:
        seconds = build["tokenize_seconds"] + build["shard_seconds"]
        rows.append(
            (
                f"pipeline {build['name']}",
                str(build["workers"]),
                f"{build['documents']:,}",
                f"{build['tokens']:,}",
                f"{seconds:.1f}",
                f"{build['tokens_per_s'] / 1e6:.3f}",
                f"{build['worker_peak_rss_mib']:.0f}",
            )
        )
    for run in [*runs["baseline_n"], *runs["baseline_1"]]:
        rows.append(
            (
                "baseline pool",
                str(run["processes"]),
                f"{run['documents']:,}",
                f"{run['tokens']:,}",
                f"{run['seconds']:.1f}",
                f"{run['tokens_per_s'] / 1e6:.3f}",
                "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for line in measurement_lines(results):
        print(line)


def markdown_section(results: dict[str, Any]) -> str:
    m, corpus = results["machine"], results["corpus"]
    single = results["builds"]["single"]
    ram = f"{m['ram_gib']} GiB RAM" if m["ram_gib"] is not None else "RAM unknown"
    body = [
        START_MARK,
        "## Data pipeline: tokenize + shard vs a SentencePiece pool",
        "",
        f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
        f"{results['runtime_seconds']:.0f} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {ram}, "
        f"{m['os']}; Python {m['python']}, sentencepiece {m['sentencepiece']}, ray {m['ray']}; "
        f"load average before the run {', '.join(str(x) for x in m['load_average_before'])}.",
        f"- Corpus: {corpus['description']}: {single['documents']:,} documents kept, "
        f"{corpus['mb']:.1f} MB, {single['tokens']:,} tokens (vocabulary "
        f"{corpus['vocab_size']}); the double corpus has {corpus['double_documents']:,} "
        "documents. Dedup off in every build; the tokenizer is trained once and reused.",
        "- Pipeline tokens/s = tokens / (tokenize + shard stage seconds) from report.json; "
        "baseline = the same documents encoded by `multiprocessing.Pool` workers "
        "(`num_threads=1`, nothing written), tokens / wall time of the map.",
        "",
    ]
    body += [f"- {line}" for line in measurement_lines(results)]
    body += ["", END_MARK]
    return "\n".join(body) + "\n"


def summarize(
    args: argparse.Namespace,
    workers: int,
    info: dict[str, Any],
    corpus: Corpus,
    cfg: Any,
    trained: dict[str, Any],
    baseline: dict[str, dict[str, Any]],
    builds: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The results: every run's figures, the diagnostics and the checks against the targets."""
    single, one, double = builds["single"], builds["single_1w"], builds["double"]
    vs_baseline = single["tokens_per_s"] / baseline["n"]["tokens_per_s"]
    scaling = single["tokens_per_s"] / one["tokens_per_s"] if workers >= 2 else None
    baseline_scaling = baseline["n"]["tokens_per_s"] / baseline["1"]["tokens_per_s"]
    measured = single["tokenize_seconds"] + single["shard_seconds"]
    return {
        "benchmark": SECTION,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "command": (
            f"bench/data_pipeline.py --scale {args.scale} --workers {args.workers} "
            f"--repeat {args.repeat}{' --smoke' if args.smoke else ''}"
        ),
        "smoke": args.smoke,
        "scale": args.scale,
        "workers": workers,
        "repeat": args.repeat,
        "machine": info,
        "corpus": {
            "description": f"{args.scale} x the Python {platform.python_version()} {corpus.base} "
            f"({corpus.documents} non-empty files, {corpus.bytes / 1e6:.1f} MB) as jsonl",
            "documents_per_copy": corpus.documents,
            "mb": args.scale * corpus.bytes / 1e6,
            "vocab_size": SMOKE_VOCAB if args.smoke else cfg.tokenizer.vocab_size,
            "double_documents": double["documents"],
        },
        "trained": trained,
        "baseline": baseline,
        "builds": builds,
        "runs": runs,
        "info": {
            "baseline_scaling": baseline_scaling,
            "pipeline_scaling_vs_baseline_scaling": (
                scaling / baseline_scaling if scaling is not None else None
            ),
            "tokens_match": single["tokens"] == baseline["n"]["tokens"],
            # task seconds of the tokenize stage over the 1-process baseline's encode time:
            # the per-unit work (read, encode, convert, write) against encoding alone
            "task_work_vs_encode": single["tokenize_task_seconds"] / baseline["1"]["seconds"],
            # share of the tokenize stage the workers spent in tasks (the rest: Ray
            # scheduling and the driver's round trips, the last units' tail)
            "tokenize_busy": (
                single["tokenize_task_seconds"] / (workers * single["tokenize_seconds"])
                if single["tokenize_seconds"]
                else 0.0
            ),
            "shard_share": single["shard_seconds"] / measured if measured else 0.0,
            "machine_scales": workers < 2 or baseline_scaling >= 0.8 * workers,
        },
        "checks": [
            check(
                f"pipeline / baseline ({workers} workers)", vs_baseline, TARGET_VS_BASELINE, True
            ),
            check(f"pipeline {workers} workers / 1 worker", scaling, TARGET_SCALING, True),
            check(
                "worker peak RSS, double / single corpus",
                double["worker_peak_rss_mib"] / single["worker_peak_rss_mib"],
                TARGET_MEMORY,
                False,
            ),
            check(
                "tokenize-stage peak RSS, double / single corpus",
                double["tokenize_peak_rss_mib"] / single["tokenize_peak_rss_mib"],
                TARGET_MEMORY,
                False,
            ),
        ],
    }


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="copies of the stdlib (default 1)")
    parser.add_argument(
        "--workers", type=int, default=2, help="pool size, capped by the CPU count (default 2)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of the throughput runs; each figure is the best round's (default 1)",
    )
    parser.add_argument("--smoke", action="store_true", help="stdlib/json only; print only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file to update"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results" / "data_pipeline.json",
        help="raw figures (JSON)",
    )
    args = parser.parse_args(argv)
    if min(args.scale, args.workers, args.repeat) < 1:
        parser.error("--scale, --workers and --repeat must be at least 1")
    started = time.perf_counter()
    workers = min(args.workers, os.cpu_count() or 1)
    base = "stdlib/json" if args.smoke else "stdlib"
    info = machine(("sentencepiece", "ray"))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-data-"))
    print(f"bench data_pipeline: {workers} worker(s), {args.scale} x {base}, in {work}")
    try:
        corpus = write_corpus(work / "corpus", base, 2 * args.scale)
        single_files, double_files = corpus.files(args.scale), corpus.files(2 * args.scale)
        vocab = [f"tokenizer.vocab_size={SMOKE_VOCAB}"] if args.smoke else []
        print(
            f"  corpus: {corpus.documents} documents, {corpus.bytes / 1e6:.1f} MB per copy, "
            f"{args.scale} copies (double: {2 * args.scale})",
            flush=True,
        )

        # The tokenizer is trained once; every measured build reuses it.
        trained = run_build("train", work, single_files, workers, vocab)
        model = Path(trained["output_dir"]) / "tokenizer.model"
        reuse = [f"tokenizer.path={model}"]

        cfg = compose_cfg(corpus_overrides(single_files) + vocab)
        texts = load_documents(single_files, cfg.normalize, cfg.filters)
        loader = (single_files, cfg.normalize, cfg.filters)
        # Rounds of the four throughput runs, interleaved so that a burst of load from
        # elsewhere hits one round, not one kind of run; each figure is the best round's.
        runs: dict[str, list[dict[str, Any]]] = {
            "baseline_n": [],
            "baseline_1": [],
            "single": [],
            "single_1w": [],
        }
        for round_ in range(args.repeat):
            suffix = f"-{round_ + 1}" if args.repeat > 1 else ""
            runs["baseline_n"].append(run_baseline(model, texts, workers, loader))
            runs["baseline_1"].append(run_baseline(model, texts, 1, loader))
            runs["single"].append(run_build(f"single{suffix}", work, single_files, workers, reuse))
            runs["single_1w"].append(run_build(f"single_1w{suffix}", work, single_files, 1, reuse))
        del texts
        baseline = {"n": best(runs["baseline_n"]), "1": best(runs["baseline_1"])}
        builds = {
            "single": best(runs["single"]),
            "single_1w": best(runs["single_1w"]),
            "double": run_build("double", work, double_files, workers, reuse),
        }
        results = summarize(args, workers, info, corpus, cfg, trained, baseline, builds, runs)
        results["runtime_seconds"] = time.perf_counter() - started
        print()
        print_table(results)
        print(f"\nruntime {results['runtime_seconds']:.0f} s")
        if args.smoke:
            (work / "data_pipeline.json").write_text(json.dumps(results, indent=1) + "\n")
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
