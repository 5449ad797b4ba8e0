"""Benchmark `kiln train`'s step time against a minimal hand-written PyTorch loop.

One run, one machine, the same model, batch shape and process count on both sides:

1. Data: the Python standard library built by `kiln data` into a temporary directory (or
   `--data DIR`, a built directory to reuse).
2. Trainer: `kiln train model=tiny_decoder objective=clm engine=ddp cluster=local_cpu`,
   `data.seq_len=128 data.global_batch_size=16 data.micro_batch_size=8 data.num_workers=0`,
   `logger=none logger.log_every=1`, no evaluation, no checkpoint before the last step, at
   `cluster.gpus_per_node` R = 1 and 2 (one rank in the warm agent `kiln train` starts; two
   ranks under torchrun in that agent, forked from it). Step time = the median of metrics.jsonl's `step_time` over the
   steps after the first `--warmup`. The mean wall time between consecutive `train` records
   (which also holds what `step_time` leaves out: the one all-reduce of the loss and the
   stop flags, logging) and the median `data_wait` are reported beside it.
3. Minimal loop (this file, `--minimal-worker`, one process for R=1, torchrun for R=2): the
   model `pretrain.models.build_model` builds from the trainer run's own resolved config
   (RUN_DIR/config.pkl, so model, seed, optimizer settings and batch shape are the trainer's),
   wrapped in DDP when R=2, plain AdamW (one group, the same lr, betas, eps, weight decay),
   micro-batches of random tokens already in memory with the keys the trainer's causal-LM
   batches hold (input ids, labels, position ids and document ids derived from the EOS ids
   among the random tokens), the same gradient accumulation (global 16 / (micro 8 x R)),
   `no_sync` on all but the last micro-batch, fp32 cross-entropy, `clip_grad_norm_`, the
   optimizer step and `zero_grad`. Step time = the median over the steps after the warm-up.
4. Threads: OMP_NUM_THREADS=1 on both sides for R=2 (what `kiln train` sets for CPU ranks);
   for R=1 both sides get OMP_NUM_THREADS = the usable cores (torch's default; `--threads`).
5. Memory allocator: both sides run with glibc's mmap and trim thresholds fixed
   (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`: what `kiln train` gives its CPU ranks,
   `pretrain.train.malloc_env`). glibc's default threshold moves with each process's
   allocation history, which made either side 15-40% slower from one run to the next; kiln
   fixing it for itself alone would make the comparison unfair to the minimal loop.

Start-up (no target): the wall time from each side's launch to the end of its step 1 (the
trainer's first `train` record; the minimal loop's clock after its first step), and more runs
of `kiln train`, two steps long: with `KILN_WARM_AGENT=0` (at R=1 the rank trained in the
`kiln train` process, at R=2 torchrun's agent started only once the config is built: as before
the warm agent), and at R=2 with `KILN_FORK_RANKS=0` (the warm agent, but the ranks started as
new processes, as before they were forked from it).

The target of the issue: trainer step time / minimal step time <= 1.10 at each R. `--repeat K`
runs K interleaved rounds (trainer and minimal loop, for each R) and keeps each figure's best
(lowest) round. Prints a table, writes bench/results/trainer.json and replaces its section of
BENCHMARKS.md (`--smoke`: a small corpus and a few steps, prints only). A missed target prints
FAIL, the exit code stays 0 (non-zero only on a crash); the section always says where the
trainer's time goes (data wait, the rest of the step, the time between steps).

    .venv/bin/python bench/trainer.py [--data DIR] [--steps N] [--repeat K] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Run as a script, Python puts bench/ first on sys.path, where bench/data_pipeline.py would
# shadow the `data_pipeline` package: drop bench/ and put the repository first.
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "trainer"
START_MARK, END_MARK = marks(SECTION)
TARGET = 1.10  # issue #9: trainer step time <= 1.10 x the minimal loop's
RANKS = (1, 2)
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 128, 16, 8
DEFAULT_STEPS, DEFAULT_WARMUP = 80, 10
SMOKE_STEPS, SMOKE_WARMUP = 8, 3
SMOKE_DATA = ["corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=1000"]
TIMEOUT = 900  # seconds for one subprocess


# --------------------------------------------------------------------------------------------
# helpers


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> float:
    """Run `command` in the repository with output to `log_path`; its wall time (seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=TIMEOUT
        )
    if code != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{command[:6]} exited with {code}; log {log_path}:\n{tail}")
    return time.perf_counter() - start


def threads_env(threads: int) -> dict[str, str]:
    """The environment of either side: threads, and the allocator settings kiln's CPU ranks
    get (so the minimal loop has them too)."""
    from pretrain.train import malloc_env

    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", **malloc_env())


# --------------------------------------------------------------------------------------------
# the two sides


def build_data(out: Path, smoke: bool) -> float:
    """`kiln data output_dir=out` (the stdlib corpus) in a subprocess; returns its wall time."""
    overrides = [f"output_dir={out}", "overwrite=true", *(SMOKE_DATA if smoke else [])]
    print(f"  kiln data {' '.join(overrides)} ...", flush=True)
    return call(
        [sys.executable, "-m", "launch.cli", "data", *overrides], out.parent / "kiln-data.log"
    )


def vocab_size(data_dir: Path) -> int:
    from data_pipeline.shards import read_manifest

    return read_manifest(data_dir).tokenizer.vocab_size


def trainer_overrides(data_dir: Path, run_dir: Path, ranks: int, steps: int) -> list[str]:
    # the model's vocabulary is the tokenizer's (4096 for the stdlib build, as in the preset):
    # a larger one crashes the sample the trainer decodes at the end of a run
    return [
        "model=tiny_decoder", f"model.vocab_size={vocab_size(data_dir)}", "objective=clm", "engine=ddp", "cluster=local_cpu",
        f"cluster.gpus_per_node={ranks}", f"data.path={data_dir}", f"data.seq_len={SEQ_LEN}",
        f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO_BATCH}",
        "data.num_workers=0", "logger=none", "logger.log_every=1", f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps + 1}", "trainer.eval_every=0", "trainer.resume=none",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def run_trainer(
    data_dir: Path, run_dir: Path, ranks: int, steps: int, warmup: int, threads: int,
    **env: str,
) -> dict[str, Any]:  # fmt: skip
    """`kiln train` at `ranks` ranks (`env` added to its environment); step figures from its
    metrics.jsonl, and its start-up: from the launch to the end of step 1."""
    overrides = trainer_overrides(data_dir, run_dir, ranks, steps)
    command = [sys.executable, "-m", "launch.cli", "train", *overrides]
    launched = time.time()
    wall = call(command, run_dir.parent / f"{run_dir.name}.log", threads_env(threads) | env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    if [r["step"] for r in train] != list(range(1, steps + 1)):
        raise RuntimeError(f"{run_dir}/metrics.jsonl: expected train records for steps 1..{steps}")
    timed = train[warmup:]
    step_times = [r["step_time"] for r in timed]
    waits = [r["data_wait"] for r in timed]
    computes = [step - wait for step, wait in zip(step_times, waits, strict=True)]
    # record times are Unix seconds rounded to 1 ms: the mean over the span is precise
    interval = (train[-1]["time"] - train[warmup - 1]["time"]) / (steps - warmup)
    return {
        "ranks": ranks,
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "wall_seconds": wall,
        "startup_seconds": train[0]["time"] - launched,
        "step_ms": 1e3 * statistics.median(step_times),
        "step_ms_mean": 1e3 * statistics.fmean(step_times),
        "data_wait_ms": 1e3 * statistics.median(waits),
        "compute_ms": 1e3 * statistics.median(computes),
        "interval_ms": 1e3 * interval,
        "step_times": step_times,
        "data_waits": waits,
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "config": str(run_dir / "config.pkl"),
    }


def run_minimal(
    config: Path, out: Path, ranks: int, steps: int, warmup: int, threads: int
) -> dict[str, Any]:
    """The minimal loop (`--minimal-worker`) at `ranks` processes, on `config`'s model."""
    worker = [str(Path(__file__).resolve()), "--minimal-worker", str(config),
              "--steps", str(steps), "--out", str(out)]  # fmt: skip
    if ranks == 1:
        command = [sys.executable, *worker]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *worker,
        ]  # fmt: skip
    launched = time.time()
    wall = call(command, out.with_suffix(".log"), threads_env(threads))
    result = json.loads(out.read_text())
    timed = result["step_times"][warmup:]
    return {
        "ranks": ranks,
        "threads": threads,
        "torch_threads": result["torch_threads"],
        "steps": steps,
        "warmup": warmup,
        "wall_seconds": wall,
        "startup_seconds": result["first_step_end"] - launched,
        "step_ms": 1e3 * statistics.median(timed),
        "step_ms_mean": 1e3 * statistics.fmean(timed),
        "step_times": timed,
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
    }


def random_batch(
    micro: int, seq_len: int, vocab: int, eos: int, masking: bool, reset: bool, generator: Any
) -> dict[str, Any]:
    """A causal-LM micro-batch of random tokens with the keys the trainer's loader yields."""
    import torch

    window = torch.randint(0, vocab, (micro, seq_len + 1), generator=generator)
    inputs, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    # a document starts after each EOS (the EOS ends the document before it)
    starts = torch.zeros_like(inputs, dtype=torch.bool)
    starts[:, 1:] = inputs[:, :-1] == eos
    index = torch.arange(seq_len).expand(micro, seq_len)
    batch = {"input_ids": inputs, "labels": labels}
    if reset:
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        batch["position_ids"] = index - first
    else:
        batch["position_ids"] = index.clone()
    if masking:
        batch["document_ids"] = starts.long().cumsum(dim=1)
    return batch


def minimal_worker(config_path: Path, steps: int, out: Path) -> int:
    """The minimal loop, as one rank (alone, or under torchrun): writes its figures (rank 0)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from data_pipeline.shards import read_manifest
    from pretrain.models import build_model

    cfg = pickle.loads(config_path.read_bytes())  # noqa: S301 - written by our kiln train run
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    data, optim = cfg.data, cfg.optim
    accumulation = data.global_batch_size // (data.micro_batch_size * world)
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model)
    module = model
    if world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(
        module.parameters(),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    manifest = read_manifest(Path(data.path))
    generator = torch.Generator().manual_seed(1000 + rank)
    pool = [
        random_batch(
            data.micro_batch_size,
            data.seq_len,
            manifest.tokenizer.vocab_size,
            manifest.tokenizer.special_ids["eos"],
            data.document_masking,
            data.reset_position_ids,
            generator,
        )
        for _ in range(4 * accumulation)
    ]
    model.train()
    times, losses, first_step_end = [], [], 0.0
    for step in range(steps):
        start = time.perf_counter()
        total = 0.0
        for micro in range(accumulation):
            batch = pool[(step * accumulation + micro) % len(pool)]
            sync = contextlib.nullcontext()
            if world > 1 and micro < accumulation - 1:
                sync = model.no_sync()
            with sync:
                inputs = {key: value for key, value in batch.items() if key != "labels"}
                logits = model(**inputs)
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
                )
                (loss / accumulation).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(module.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(total) / accumulation)
        first_step_end = first_step_end or time.time()
    if rank == 0:
        record = {"step_times": times, "losses": losses, "torch_threads": torch.get_num_threads(),
                  "first_step_end": first_step_end}  # fmt: skip
        out.write_text(json.dumps(record) + "\n")
    if world > 1:
        dist.destroy_process_group()
    return 0


# functions whose time per call the profile reports: (file relative to the repository or
# site-packages, function name) -> label
PROFILED = {
    ("pretrain/engine/ddp.py", "forward_backward"): "engine.forward_backward (per micro-batch)",
    ("pretrain/engine/__init__.py", "compute_loss"): "compute_loss (forward + loss)",
    ("pretrain/engine/__init__.py", "to_device"): "engine.to_device",
    ("pretrain/engine/ddp.py", "optimizer_step"): "engine.optimizer_step (clip, AdamW, sched.)",
    ("torch/nn/utils/clip_grad.py", "clip_grad_norm_"): "clip_grad_norm_",
    ("torch/optim/adam.py", "step"): "AdamW step",
    ("torch/optim/lr_scheduler.py", "step"): "LR scheduler step",
    ("pretrain/data/loader.py", "__iter__"): "loader: next micro-batch",
    ("pretrain/trainer.py", "step_all_reduce"): "loss + stop flags all-reduce (step_all_reduce)",
    ("pretrain/metrics.py", "log"): "metrics record + console line",
    ("pretrain/trainer.py", "_memory_gib"): "_memory_gib (getrusage)",
    ("~", "<built-in method faulthandler.dump_traceback_later>"): "watchdog re-arm",
}


# `kiln ARGS` under cProfile, its profile written to argv[1]. A finished one-rank `kiln train`
# ends with os._exit (`pretrain.train.exit_now`: no interpreter teardown), which would end the
# process before `python -m cProfile` writes anything: here it ends with SystemExit instead.
PROFILED_KILN = """
import cProfile, sys
import pretrain.train
from launch.cli import main

def exit_now(code):
    raise SystemExit(code)

pretrain.train.exit_now = exit_now
out, sys.argv = sys.argv[1], ["kiln", *sys.argv[2:]]
profiler = cProfile.Profile()
try:
    code = profiler.runcall(main)
except SystemExit as end:
    code = end.code
profiler.dump_stats(out)
sys.exit(code)
"""


def profile_trainer(data_dir: Path, run_dir: Path, steps: int, threads: int) -> dict[str, Any]:
    """`kiln train` at one rank under cProfile: time per call of the loop's parts."""
    import pstats

    profile = run_dir.parent / "trainer.prof"
    overrides = trainer_overrides(data_dir, run_dir, 1, steps)
    command = [sys.executable, "-c", PROFILED_KILN, str(profile), "train", *overrides]
    # the rank in the `kiln train` process, where the profiler is
    call(command, run_dir.parent / "profile.log", threads_env(threads) | {"KILN_WARM_AGENT": "0"})
    stats = pstats.Stats(str(profile))
    # site-packages first: the virtual environment may sit inside the repository
    roots = [p + os.sep for p in sys.path if p.endswith("site-packages")]
    roots.append(str(REPO) + os.sep)
    rows = []
    for (filename, line, name), (_, calls, _own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename
        for root in roots:
            where = where.replace(root, "")
        label = PROFILED.get((where, name))
        if label is not None:
            rows.append(
                {
                    "part": f"{label} (line {line})" if name == "__iter__" else label,
                    "order": list(PROFILED.values()).index(label),
                    "calls": calls,
                    "cumulative_seconds": cumulative,
                    "ms_per_call": 1e3 * cumulative / max(1, calls),
                }
            )
    rows.sort(key=lambda row: (row["order"], row["part"]))
    return {"ranks": 1, "threads": threads, "steps": steps, "parts": rows}


# --------------------------------------------------------------------------------------------
# report


def summarize(runs: dict[str, list[dict[str, Any]]], ranks: list[int]) -> list[dict[str, Any]]:
    """Per R: each side's best round (lowest median step), the ratios and the breakdown."""
    rows = []
    for r in ranks:
        trainer = min(runs[f"trainer{r}"], key=lambda run: run["step_ms"])
        minimal = min(runs[f"minimal{r}"], key=lambda run: run["step_ms"])
        interval = min(run["interval_ms"] for run in runs[f"trainer{r}"])
        minimal_mean = min(run["step_ms_mean"] for run in runs[f"minimal{r}"])
        ratio = trainer["step_ms"] / minimal["step_ms"]
        startup = min(run["startup_seconds"] for run in runs[f"trainer{r}"])
        cold = min((run["startup_seconds"] for run in runs.get(f"cold{r}", [])), default=None)
        new_processes = min(
            (run["startup_seconds"] for run in runs.get(f"newproc{r}", [])), default=None
        )
        rows.append(
            {
                "ranks": r,
                "startup_seconds": startup,
                "startup_cold_agent_seconds": cold,
                "startup_new_process_ranks_seconds": new_processes,
                "minimal_startup_seconds": min(
                    run["startup_seconds"] for run in runs[f"minimal{r}"]
                ),
                "threads": trainer["threads"],
                "accumulation": GLOBAL_BATCH // (MICRO_BATCH * r),
                "trainer": trainer,
                "minimal": minimal,
                "trainer_interval_ms": interval,
                "minimal_mean_ms": minimal_mean,
                "ratio": ratio,
                "interval_ratio": interval / minimal_mean,
                "pass": ratio <= TARGET,
            }
        )
    return rows


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [
        (
            "ranks",
            "threads/rank",
            "trainer step_time ms",
            "data_wait ms",
            "minimal loop ms",
            "ratio",
            "trainer ms between steps",
            "minimal mean ms",
            "ratio (between steps)",
        )
    ]
    for row in results["rows"]:
        rows.append(
            (
                str(row["ranks"]),
                str(row["threads"]),
                f"{row['trainer']['step_ms']:.2f}",
                f"{row['trainer']['data_wait_ms']:.2f}",
                f"{row['minimal']['step_ms']:.2f}",
                f"{row['ratio']:.3f}x",
                f"{row['trainer_interval_ms']:.2f}",
                f"{row['minimal_mean_ms']:.2f}",
                f"{row['interval_ratio']:.3f}x",
            )
        )
    return rows


def check_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for row in results["rows"]:
        verdict = "PASS" if row["pass"] else "FAIL"
        lines.append(
            f"trainer / minimal loop step time, {row['ranks']} rank(s): {row['ratio']:.3f}x, "
            f"target <= {TARGET:.2f}x: {verdict}"
        )
    return lines


def breakdown_lines(results: dict[str, Any]) -> list[str]:
    """Where the trainer's time goes, per R, from its metrics.jsonl against the minimal loop."""
    lines = []
    for row in results["rows"]:
        trainer, minimal = row["trainer"], row["minimal"]
        extra = trainer["step_ms"] - minimal["step_ms"]
        outside = row["trainer_interval_ms"] - trainer["step_ms_mean"]
        lines.append(
            f"{row['ranks']} rank(s) ({row['accumulation']} micro-batch(es) of "
            f"{MICRO_BATCH} x {SEQ_LEN} per rank per step): the trainer's median step is "
            f"{extra:+.2f} ms from the minimal loop's; of its step, data_wait (the loader at "
            f"num_workers=0, inline) is {trainer['data_wait_ms']:.2f} ms and the rest (forward, "
            f"backward, clip, AdamW, scheduler, loss .item()) {trainer['compute_ms']:.2f} ms "
            f"against the minimal loop's {minimal['step_ms']:.2f} ms; between steps, outside "
            f"`step_time` (the all-reduce of the loss and the stop flags, the metrics record "
            f"and console line, the watchdog re-arm) {outside:.2f} ms per step "
            f"(mean record interval {row['trainer_interval_ms']:.2f} ms - mean step_time "
            f"{trainer['step_ms_mean']:.2f} ms)"
        )
    return lines


def startup_lines(results: dict[str, Any]) -> list[str]:
    """Start-up, launch to the end of step 1 (no target: what a user waits for each run)."""
    lines = []
    for row in results["rows"]:
        if "startup_seconds" not in row:  # results written before start-up was measured
            continue
        startup, minimal = row["startup_seconds"], row["minimal_startup_seconds"]
        line = (
            f"start-up, {row['ranks']} rank(s), the launch to the end of step 1: `kiln train` "
            f"{startup:.2f} s (Hydra's composing, the config, the preflight checks, "
            + ("torchrun, " if row["ranks"] > 1 else "")
            + f"the imports, the model, the loader), the minimal loop {minimal:.2f} s "
            + ("(torchrun, " if row["ranks"] > 1 else "(")
            + f"the imports, the model): {startup / minimal:.2f}x, no target"
        )
        cold = row.get("startup_cold_agent_seconds")
        if cold:
            without = (
                "torchrun's agent started once the config is built"
                if row["ranks"] > 1
                else "the rank trained in the `kiln train` process, not in the warm agent"
            )
            line += (
                f"; with {without} (`KILN_WARM_AGENT=0`) {cold:.2f} s: the warm agent takes "
                f"{startup / cold:.3f}x of it ({cold - startup:.2f} s sooner)"
            )
        new_processes = row.get("startup_new_process_ranks_seconds")
        if new_processes:
            line += (
                f"; with the warm agent but ranks started as new processes, not forked from it "
                f"(`KILN_FORK_RANKS=0`) {new_processes:.2f} s: forking takes "
                f"{startup / new_processes:.3f}x of it ({new_processes - startup:.2f} s sooner)"
            )
        lines.append(line)
    return lines


def profile_lines(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile")
    if not profile:
        return []
    parts = "; ".join(
        f"{row['part']} {row['ms_per_call']:.2f} ms x {row['calls']}" for row in profile["parts"]
    )
    return [
        f"cProfile of `kiln train` at 1 rank ({profile['threads']} thread(s), "
        f"{profile['steps']} steps, all steps and start-up included; the profiler slows "
        f"Python code down), time per call: {parts}"
    ]


def print_table(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
    lines = [*check_lines(results), *breakdown_lines(results), *startup_lines(results)]
    for line in [*lines, *profile_lines(results)]:
        print(line)


def markdown_section(results: dict[str, Any]) -> str:
    m, corpus = results["machine"], results["corpus"]
    ram = f"{m['ram_gib']} GiB RAM" if m["ram_gib"] is not None else "RAM unknown"
    of = (
        f"best (lowest) of {results['repeat']} interleaved rounds"
        if results["repeat"] > 1
        else "1 round"
    )
    threads = ", ".join(f"{row['threads']} at {row['ranks']} rank(s)" for row in results["rows"])
    body = [
        START_MARK,
        "## Trainer: `kiln train` step vs a minimal PyTorch loop",
        "",
        f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
        f"{results['runtime_seconds']:.0f} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {ram}, "
        f"{m['os']}; Python {m['python']}, torch {m['torch']}; load average before the run "
        f"{', '.join(str(x) for x in m['load_average_before'])}.",
        f"- Model: `tiny_decoder` ({results['parameters']:,} parameters), causal LM, "
        f"global batch {GLOBAL_BATCH} x seq {SEQ_LEN}, micro-batch {MICRO_BATCH} per rank "
        "(accumulation 2 at 1 rank, 1 at 2 ranks), DDP over gloo at 2 ranks, AdamW, gradient "
        f"clipping at 1.0; data: {corpus}.",
        "- Trainer: `kiln train model=tiny_decoder objective=clm engine=ddp cluster=local_cpu "
        "cluster.gpus_per_node=R data.seq_len=128 data.global_batch_size=16 "
        "data.micro_batch_size=8 data.num_workers=0 logger=none logger.log_every=1 "
        "trainer.eval_every=0` (no checkpoint before the last step); step time = median of "
        f"metrics.jsonl's `step_time` over steps {results['warmup'] + 1}-{results['steps']}; "
        "`ms between steps` = mean wall time between consecutive train records (adds the "
        "one all-reduce of the loss and the stop flags, and logging, which `step_time` leaves "
        "out).",
        "- Minimal loop: `bench/trainer.py --minimal-worker` on the trainer run's own resolved "
        "config: `build_model`, DDP at 2 ranks (launched by torchrun), plain AdamW with the "
        "same hyperparameters, random-token micro-batches already in memory with the "
        "trainer's keys (input ids, labels, position ids, document ids), the same "
        "accumulation with `no_sync`, fp32 cross-entropy, `clip_grad_norm_`, step, "
        f"`zero_grad`; median over the same steps. Threads (OMP_NUM_THREADS, both sides): "
        f"{threads}. Both sides run with glibc's mmap and trim thresholds fixed (what "
        "`kiln train` gives CPU ranks; glibc's moving default made either side 15-40% slower "
        f"from run to run). Each figure is the {of}.",
        "",
    ]
    rows = table_rows(results)
    body.append("| " + " | ".join(rows[0]) + " |")
    body.append("|" + "|".join("---" for _ in rows[0]) + "|")
    body += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    body.append("")
    body += [f"- {line}" for line in check_lines(results)]
    body += [f"- {line}" for line in breakdown_lines(results)]
    body += [f"- {line}" for line in startup_lines(results)]
    body += [f"- {line}" for line in profile_lines(results)]
    body += ["", END_MARK]
    return "\n".join(body) + "\n"


# --------------------------------------------------------------------------------------------
# main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `kiln data` output directory to reuse")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per run")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="steps not timed")
    p.add_argument(
        "--repeat", type=int, default=3, help="interleaved rounds, best of them (default 3)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS at 1 rank (default: all cores)"
    )
    p.add_argument("--ranks", default="1,2", help="process counts (default 1,2)")
    p.add_argument("--smoke", action="store_true", help="small corpus, few steps; print only")
    p.add_argument("--profile", action="store_true", help="cProfile the trainer at 1 rank")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file to update")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results" / "trainer.json",
        help="raw figures (JSON)",
    )
    p.add_argument("--minimal-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.minimal_worker:
        return minimal_worker(args.minimal_worker, args.steps, args.out)
    if args.smoke:
        args.steps, args.warmup, args.repeat = SMOKE_STEPS, SMOKE_WARMUP, 1
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    if min(args.warmup, args.repeat, *ranks) < 1 or args.steps <= args.warmup:
        p.error("--warmup, --repeat and --ranks must be at least 1, --steps above --warmup")
    started = time.perf_counter()
    info = machine(("torch",))
    one_rank_threads = args.threads or usable_cores()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-trainer-"))
    print(f"bench trainer: ranks {ranks}, {args.steps} steps ({args.warmup} warm-up), in {work}")
    try:
        if args.data:
            data_dir = args.data.resolve()
            corpus = f"the `kiln data` directory given by `--data` ({data_dir.name})"
        else:
            data_dir = work / "data"
            seconds = build_data(data_dir, args.smoke)
            corpus = f"the Python stdlib{'/json' if args.smoke else ''} shards built by "
            corpus += f"`kiln data` ({seconds:.0f} s)"
        runs: dict[str, list[dict[str, Any]]] = {}
        # Rounds interleave both sides at every R, so that a burst of load from elsewhere hits
        # one round, not one side; each figure is the best round's.
        for round_ in range(args.repeat):
            print(f"  round {round_ + 1}/{args.repeat} ...", flush=True)
            for r in ranks:
                threads = one_rank_threads if r == 1 else 1
                run_dir = work / f"run{r}-{round_}"
                trainer = run_trainer(data_dir, run_dir, r, args.steps, args.warmup, threads)
                runs.setdefault(f"trainer{r}", []).append(trainer)
                out = work / f"minimal{r}-{round_}.json"
                config = Path(trainer["config"])
                minimal = run_minimal(config, out, r, args.steps, args.warmup, threads)
                runs.setdefault(f"minimal{r}", []).append(minimal)
                # start-up without the warm agent (and at 2+ ranks, without forked ranks): two
                # steps are enough
                cold = run_trainer(data_dir, work / f"cold{r}-{round_}", r, 2, 1, threads,
                                   KILN_WARM_AGENT="0")  # fmt: skip
                runs.setdefault(f"cold{r}", []).append(cold)
                if r > 1:
                    new_processes = run_trainer(data_dir, work / f"newproc{r}-{round_}", r, 2, 1,
                                                threads, KILN_FORK_RANKS="0")  # fmt: skip
                    runs.setdefault(f"newproc{r}", []).append(new_processes)
                print(
                    f"    {r} rank(s), {threads} thread(s): trainer {trainer['step_ms']:.2f} ms "
                    f"(data_wait {trainer['data_wait_ms']:.2f}, between steps "
                    f"{trainer['interval_ms']:.2f}), minimal {minimal['step_ms']:.2f} ms, "
                    f"ratio {trainer['step_ms'] / minimal['step_ms']:.3f}x",
                    flush=True,
                )
        cfg = pickle.loads(Path(runs[f"trainer{ranks[0]}"][0]["config"]).read_bytes())  # noqa: S301
        from pretrain.models import build_model

        command = f"bench/trainer.py --repeat {args.repeat}"
        command += f" --steps {args.steps}" if args.steps != DEFAULT_STEPS else ""
        command += f" --warmup {args.warmup}" if args.warmup != DEFAULT_WARMUP else ""
        command += f" --threads {args.threads}" if args.threads else ""
        command += " --data DIR" if args.data else ""
        command += " --smoke" if args.smoke else ""
        command += " --profile" if args.profile else ""
        results: dict[str, Any] = {
            "benchmark": SECTION,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": git_commit(),
            "command": command,
            "smoke": args.smoke,
            "repeat": args.repeat,
            "steps": args.steps,
            "warmup": args.warmup,
            "target": TARGET,
            "machine": info,
            "corpus": corpus,
            "parameters": sum(p.numel() for p in build_model(cfg.model).parameters()),
            "rows": summarize(runs, ranks),
            "runs": runs,
        }
        if args.profile or not all(row["pass"] for row in results["rows"]):
            print("  cProfile of the trainer at 1 rank ...", flush=True)
            run_dir = work / "profile-run"
            results["profile"] = profile_trainer(data_dir, run_dir, args.steps, one_rank_threads)
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
