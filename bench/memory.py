"""Per-rank peak memory of DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 at 1 and 2 ranks vs `kiln plan`.

One run, this machine, CPU ranks over gloo (fp32: `kiln plan`'s CPU convention). For each engine
E in ddp (plan's zero0 row), zero1, zero2, zero3, fsdp and R in 1, 2:

1. The config: the `train` Hydra tree composed with `model=tiny_decoder` widened (`MODEL`,
   about 28M parameters, so weights, gradients and Adam state, about 420 MiB at one rank,
   dominate the interpreter), `engine=E cluster=local_cpu cluster.gpus_per_node=R`,
   seq 64, global batch 4, micro-batch 2, `data.num_workers=0`, a few steps; the same config
   `kiln train` resolves.
2. The ranks: `bench/memory.py --rank-worker` under torchrun (R=2) or alone (R=1), with the
   environment `kiln train` gives CPU ranks (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1). Each rank
   imports everything the trainer uses (torch, DeepSpeed, the engines, the loader, the
   logger), then runs `pretrain.train.worker(cfg)`, the function every rank of `kiln train`
   runs, measured two ways from that point on (the baseline: the interpreter and libraries,
   before the model is built):
   * live tensor bytes, the measure the target applies to: what `kiln plan` estimates, and the
     CPU counterpart of `torch.cuda.max_memory_allocated` (what the GPU bench compares). Torch
     has no CPU allocator statistics, so c10's CPU allocator is asked to count: its
     `caffe2_report_cpu_memory_usage` flag (set through ctypes; torch has no binding for it)
     makes it keep a running total of the bytes allocated since, on every thread (gloo frees
     some tensors on its own threads: without the flag the total drifts up by what they
     free), and torch's profiler, recording memory events only (`profile_memory`, no operator
     records), reports that total with every allocation and free. Peak = the largest total;
     nothing is sampled, so no transient is missed. Without the flag (another torch build)
     only the threads the profiler follows are counted, and the results say so.
   * RSS, as a second column: sampled every 10 ms on a thread, peak - baseline. It also holds
     what the allocator keeps after tensors are freed (glibc's heap and arenas), the profiler's
     own records and Python objects, so it reads higher than the tensor peak; no target.
   Both peaks are taken up to the last step's metrics record (the final checkpoint and export
   are left out); "start-up" = the tensor peak up to the trainer's start record (the model
   built and the engine initialised, before the first step).
3. The plan: `kiln plan` with the same overrides (`plan.format=json`): the strategy's total per
   rank (weights + gradients + optimizer + buffers + activations), and its start-up figure
   (under FSDP2 and ZeRO-3, rank 0's adds the fp32 weights it builds in host memory, which on
   the CPU is the device's).

Target (issue #9): peak live tensor bytes / plan within 15% for every rank, where plan = the
larger of the total and the start-up figure. Prints a table, writes bench/results/memory.json
and the `memory` section of BENCHMARKS.md (`--smoke`: a smaller model, 1 rank, zero2 and fsdp,
prints only). A missed target prints FAIL (exit code 0).

    .venv/bin/python bench/memory.py [--data DIR] [--engines zero1,zero2,zero3,fsdp] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "memory"
START_MARK, END_MARK = marks(SECTION)
TARGET = 0.15  # |measured / plan - 1|
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
MODEL = ["model=tiny_decoder", "model.d_model=512", "model.n_layers=8", "model.n_heads=8",
         "model.n_kv_heads=8", "model.d_ff=1536", "model.max_seq_len=64"]  # fmt: skip
SMOKE_MODEL = ["model=tiny_decoder", "model.max_seq_len=64"]
SEQ, GLOBAL_BATCH, MICRO_BATCH = 64, 4, 2
STEPS, SMOKE_STEPS = 4, 2
SMOKE_DATA = ["corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=1000"]
SAMPLE_SECONDS = 0.01
TIMEOUT = 600


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def count_tensors_on_every_thread() -> bool:
    """Make c10's CPU allocator keep its running total of live bytes for every thread (its
    `caffe2_report_cpu_memory_usage` flag; without it the total follows only the threads the
    profiler follows). Counting starts now: earlier allocations are not in the total, and
    their frees are ignored. Returns False when this torch build has no such flag."""
    import torch

    try:
        c10 = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
        ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_report_cpu_memory_usage").value = True
    except (OSError, ValueError):
        return False
    return True


def start_memory_events() -> None:
    """Start torch's profiler with memory events and no op events: `torch.profiler.profile`
    also records every operator, whose records (on the heap, interleaved with freed tensors)
    would inflate the RSS this script reports next to the tensor peak. Its low-level API takes
    the record scopes to follow; USER_SCOPE alone (no `record_function` here) leaves the
    allocator's events."""
    from torch._C._profiler import (
        ProfilerActivity,
        ProfilerConfig,
        ProfilerState,
        RecordScope,
        _ExperimentalConfig,
    )
    from torch.autograd import _enable_profiler, _prepare_profiler

    config = ProfilerConfig(
        ProfilerState.KINETO,
        report_input_shapes=False,
        profile_memory=True,
        with_stack=False,
        with_flops=False,
        with_modules=False,
        experimental_config=_ExperimentalConfig(),
    )
    _prepare_profiler(config, {ProfilerActivity.CPU})
    _enable_profiler(config, {ProfilerActivity.CPU}, {RecordScope.USER_SCOPE})


def stop_memory_events() -> list[tuple[int, int]]:
    """Stop the profiler `start_memory_events` started: (time in ns since the epoch, live tensor
    bytes after it) for every allocation and free it saw, in time order."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.autograd import _disable_profiler

    totals = []
    pending = list(_disable_profiler().experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            totals.append((event.start_time_ns, event.extra_fields.total_allocated))
    return sorted(totals)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# one rank


def rank_worker(config_path: Path, out_dir: Path) -> int:
    """One rank of `kiln train`, with its RSS sampled; writes rank<R>.json into `out_dir`."""
    # everything the trainer imports, before the baseline: the rest is the model's
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    import pretrain.data.loader  # noqa: F401
    import pretrain.engine.deepspeed_engine  # noqa: F401
    import pretrain.engine.fsdp  # noqa: F401
    import pretrain.metrics  # noqa: F401
    import pretrain.optim  # noqa: F401
    import pretrain.trainer  # noqa: F401
    from pretrain.train import worker

    cfg = pickle.loads(config_path.read_bytes())  # noqa: S301 - written by this script
    every_thread = count_tensors_on_every_thread()
    baseline = rss_bytes()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), rss_bytes()))
            done.wait(SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start_memory_events()
    try:
        code = worker(cfg)
    finally:
        tensors = stop_memory_events()
        done.set()
        thread.join()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "baseline": baseline, "hwm": rss_bytes("VmHWM"), "samples": samples,
              "tensors": tensors, "every_thread": every_thread}  # fmt: skip
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return code


# --------------------------------------------------------------------------------------------
# the driver


def compose(overrides: list[str], name: str = "train") -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from pretrain.config import build_config, register_configs

    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        return build_config(hydra_compose(name, overrides=overrides))


def overrides_for(engine: str, ranks: int, data: Path, run_dir: Path, smoke: bool,
                  vocab: int) -> list[str]:  # fmt: skip
    steps = SMOKE_STEPS if smoke else STEPS
    return [
        *(SMOKE_MODEL if smoke else MODEL), f"model.vocab_size={vocab}", "objective=clm",
        f"engine={engine}", "cluster=local_cpu", f"cluster.gpus_per_node={ranks}",
        f"data.path={data}", f"data.seq_len={SEQ}", f"data.global_batch_size={GLOBAL_BATCH}",
        f"data.micro_batch_size={MICRO_BATCH}", "data.num_workers=0", "logger=none",
        "logger.log_every=1", f"trainer.max_steps={steps}", f"trainer.checkpoint_every={steps + 1}",
        "trainer.eval_every=0", "trainer.resume=none", "trainer.sample_tokens=4",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def plan_for(overrides: list[str], strategy: str) -> dict[str, int]:
    from pretrain.plan import build_plan

    cfg = compose([o for o in overrides if not o.startswith("trainer.")], "plan")
    plan = build_plan(cfg)
    memory = plan.to_json()["memory"][strategy]
    keys = ("weights", "gradients", "optimizer", "buffers", "activations", "total", "startup",
            "host_weights")  # fmt: skip
    figures = {key: int(memory[key]) for key in keys}
    # the run's peak as the plan predicts it: the steady state, or start-up when that is larger;
    # on the CPU host memory is the device's, so rank 0's start-up also holds the fp32 weights
    # it builds for FSDP2 and ZeRO-3 (`host_weights`)
    rank0_startup = figures["startup"] + figures["host_weights"]
    return figures | {"peak": max(figures["total"], figures["startup"]),
                      "rank0_startup": rank0_startup,
                      "rank0_peak": max(figures["total"], rank0_startup),
                      "params": plan.model["params_total"]}  # fmt: skip


def planned(plan: dict[str, int], rank: int, key: str) -> int:
    """The plan's `key` ("peak" or "startup") for `rank` (rank 0: with its host weights)."""
    return plan.get(f"rank0_{key}", plan[key]) if rank == 0 else plan[key]


def run_one(engine: str, ranks: int, data: Path, work: Path, smoke: bool, vocab: int
            ) -> dict[str, Any]:  # fmt: skip
    from pretrain.train import write_run_config

    run_dir = work / f"{engine}-r{ranks}"
    overrides = overrides_for(engine, ranks, data, run_dir, smoke, vocab)
    config = write_run_config(compose(overrides), run_dir)
    out = run_dir / "memory"
    out.mkdir(parents=True, exist_ok=True)
    worker = [str(Path(__file__).resolve()), "--rank-worker", str(config), "--out", str(out)]
    if ranks == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                   *worker]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = work / f"{engine}-r{ranks}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                               env=env, timeout=TIMEOUT)  # fmt: skip
    if code != 0:
        raise RuntimeError(f"{engine} at {ranks} rank(s) exited with {code}; log {log}:\n"
                           f"{log.read_text(errors='replace')[-3000:]}")  # fmt: skip
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    cutoff = max(r["time"] for r in train) + 0.005  # record times are rounded to 1 ms
    started = next(r["time"] for r in records if r.get("event") == "start") + 0.005
    strategy = {"fsdp": "fsdp", "ddp": "zero0"}.get(engine, engine)
    plan = plan_for(overrides, strategy)
    per_rank = []
    for rank in range(ranks):
        record = json.loads((out / f"rank{rank}.json").read_text())
        rss_peak = max(rss for t, rss in record["samples"] if t <= cutoff)
        tensors = [(t / 1e9, live) for t, live in record["tensors"]]
        peak_time, tensor_peak = max(((t, live) for t, live in tensors if t <= cutoff),
                                     key=lambda item: item[1])  # fmt: skip
        startup = max(live for t, live in tensors if t <= started)
        per_rank.append({
            "rank": rank, "tensor_peak": tensor_peak, "tensor_startup": startup,
            "tensor_peak_in": "start-up" if peak_time <= started else "training",
            "every_thread": record["every_thread"],
            "ratio": tensor_peak / planned(plan, rank, "peak"),
            "rss_baseline": record["baseline"], "rss_peak": rss_peak,
            "rss_measured": rss_peak - record["baseline"], "rss_hwm_whole_run": record["hwm"],
            "rss_ratio": (rss_peak - record["baseline"]) / planned(plan, rank, "peak"),
        })  # fmt: skip
    return {"engine": engine, "ranks": ranks, "wall_seconds": time.perf_counter() - start,
            "steps": len(train), "plan": plan, "per_rank": per_rank,
            "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"]}  # fmt: skip


MIB = 2**20


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [("engine", "ranks", "rank", "tensor peak MiB",
             "plan MiB (weights+grads+optim+buffers+acts)", "tensors / plan",
             "start-up MiB: tensors / plan", "RSS peak - baseline MiB", "RSS / plan")]  # fmt: skip
    for run in results["runs"]:
        p = run["plan"]
        parts = "+".join(f"{p[k] / MIB:.0f}" for k in ("weights", "gradients", "optimizer",
                                                         "buffers", "activations"))  # fmt: skip
        for r in run["per_rank"]:
            rows.append((run["engine"], str(run["ranks"]), str(r["rank"]),
                         f"{r['tensor_peak'] / MIB:.0f}", f"{p['total'] / MIB:.0f} ({parts})",
                         f"{r['ratio']:.3f}x",
                         f"{r['tensor_startup'] / MIB:.0f} / "
                         f"{planned(p, r['rank'], 'startup') / MIB:.0f}",
                         f"{r['rss_peak'] / MIB:.0f} - {r['rss_baseline'] / MIB:.0f} = "
                         f"{r['rss_measured'] / MIB:.0f}", f"{r['rss_ratio']:.3f}x"))  # fmt: skip
    return rows


def check_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for run in results["runs"]:
        for r in run["per_rank"]:
            ok = abs(r["ratio"] - 1) <= TARGET
            threads = "" if r["every_thread"] else " (tensors of the profiled threads only)"
            lines.append(f"{run['engine']}, {run['ranks']} rank(s), rank {r['rank']}: peak live "
                         f"tensor bytes / plan {r['ratio']:.3f}x{threads}, target "
                         f"{1 - TARGET:.2f}x-{1 + TARGET:.2f}x: "
                         f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
    for failure in results.get("failures", []):
        lines.append(f"{failure['engine']}, {failure['ranks']} rank(s): FAILED to run "
                     f"({failure['error'].splitlines()[0]})")  # fmt: skip
    return lines


def markdown_section(results: dict[str, Any]) -> str:
    m = results["machine"]
    ram = f"{m['ram_gib']} GiB RAM" if m["ram_gib"] is not None else "RAM unknown"
    params = results["runs"][0]["plan"]["params"] if results["runs"] else 0
    body = [
        START_MARK,
        "## Memory: per-rank peak of DDP, ZeRO-1/2/3 and FSDP2 vs `kiln plan`",
        "",
        f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
        f"{results['runtime_seconds']:.0f} s.{' PRELIMINARY: ' + results['note'] if results.get('note') else ''}",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {ram}, "
        f"{m['os']}; Python {m['python']}, torch {m['torch']}, deepspeed {m['deepspeed']}.",
        f"- Model: `{' '.join(results['model'])}` ({params:,} parameters), causal LM, seq {SEQ}, "
        f"global batch {GLOBAL_BATCH}, micro-batch {MICRO_BATCH}, {results['steps']} steps, CPU "
        "ranks over gloo, fp32 (`kiln plan`: 4 + 4 + 8 bytes per parameter, 4 + 4 + 12 under "
        "DeepSpeed); data: "
        f"{results['corpus']}.",
        "- Each rank runs `pretrain.train.worker` (what every rank of `kiln train` runs) on the "
        "config the `train` Hydra tree composes, under torchrun at 2 ranks, with "
        "DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 as `kiln train` sets them, after importing "
        "torch, DeepSpeed, the engines, the loader and the logger (the baseline), up to the "
        "last step's metrics record (the final checkpoint and export are left out).",
        "- Tensor peak (the target's measure): the largest number of bytes held by live "
        "tensors allocated since the baseline, as c10's CPU allocator counts them (its "
        "`caffe2_report_cpu_memory_usage` flag, set through ctypes, keeps the running total "
        "for every thread, gloo's included) and torch's profiler (memory events only) "
        "reports it at every allocation and free, so no transient is missed: the CPU "
        "counterpart of `torch.cuda.max_memory_allocated`, and what `kiln plan` estimates. "
        "Start-up = the same peak up to the trainer's start record (model built, engine "
        "initialised).",
        "- RSS (no target): the largest RSS sampled every 10 ms minus the RSS at the baseline. "
        "It also counts what glibc's allocator keeps after tensors are freed, the profiler's "
        "records and Python objects, so it reads above the tensor peak.",
        "- Plan = `kiln plan` with the same overrides: the engine's total per rank (its start-up "
        "figure when that is larger; the column shows both). Under FSDP2 and ZeRO-3 rank 0 "
        "builds the whole fp32 model in host memory, which on the CPU is the device's: its "
        "start-up figure adds `kiln plan`'s host weights. What it counts, from what the "
        "engines allocate (details in `pretrain/plan.py`): DeepSpeed keeps the model's weights "
        "whole in one flat buffer (ZeRO-1/2) and an fp32 master partition even of fp32 weights "
        "(optimizer 12 bytes / N); ZeRO-1/2 fill one or two reduce buckets (kiln caps them at "
        "the model's size) and all-reduce each through a flat copy; ZeRO-3 keeps one reduce "
        "bucket for the run and, on 2 ranks, the whole model gathered from forward to backward "
        "(below `stage3_max_reuse_distance`) next to the prefetch bucket it was cut from; "
        "the optimizer step flattens the gradient partition to fp32 and the CPU's non-fused "
        "AdamW makes two temporaries the size of DeepSpeed's flat partition.",
        "",
    ]
    rows = table_rows(results)
    body.append("| " + " | ".join(rows[0]) + " |")
    body.append("|" + "|".join("---" for _ in rows[0]) + "|")
    body += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    body.append("")
    body += [f"- {line}" for line in check_lines(results)]
    body += ["", END_MARK]
    return "\n".join(body) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `kiln data` output directory to reuse")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--smoke", action="store_true", help="small model, 1 rank, zero2 and fsdp")
    p.add_argument("--note", default="", help="a note for the section (e.g. 'preliminary')")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "memory.json")
    p.add_argument("--rank-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rank_worker:
        return rank_worker(args.rank_worker, args.out)
    if args.smoke:
        args.engines, args.ranks = "zero2,fsdp", "1"
    engines = [e for e in args.engines.split(",") if e]
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    started = time.perf_counter()
    info = machine(("torch", "deepspeed"))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-memory-"))
    print(f"bench memory: engines {engines}, ranks {ranks}, in {work}", flush=True)
    try:
        if args.data:
            data, corpus = args.data.resolve(), "the `kiln data` directory given by `--data`"
        else:
            data = work / "data"
            command = [sys.executable, "-m", "launch.cli", "data", f"output_dir={data}",
                       "overwrite=true", *SMOKE_DATA]  # fmt: skip
            print("  kiln data (stdlib/json) ...", flush=True)
            with open(work / "kiln-data.log", "w") as log:
                subprocess.check_call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            corpus = "the Python stdlib's json package built by `kiln data` (vocabulary 1000)"
        from data_pipeline.shards import read_manifest

        vocab = read_manifest(data).tokenizer.vocab_size
        runs, failures = [], []
        for engine in engines:
            for r in ranks:
                print(f"  {engine} at {r} rank(s) ...", flush=True)
                try:
                    run = run_one(engine, r, data, work, args.smoke, vocab)
                except Exception as error:  # noqa: BLE001 - reported, the others still run
                    failures.append({"engine": engine, "ranks": r, "error": str(error)})
                    print(f"    FAILED: {error}", flush=True)
                    continue
                runs.append(run)
                print("    " + ", ".join(f"rank {x['rank']}: tensors {x['tensor_peak'] / MIB:.0f} "
                                         f"MiB ({x['ratio']:.3f}x plan "
                                         f"{run['plan']['peak'] / MIB:.0f}), RSS "
                                         f"{x['rss_measured'] / MIB:.0f} MiB"
                                         for x in run["per_rank"]), flush=True)  # fmt: skip
        command = "bench/memory.py" + (" --smoke" if args.smoke else "")
        command += f" --engines {args.engines}" if args.engines != ",".join(ENGINES) else ""
        command += f" --ranks {args.ranks}" if args.ranks != "1,2" else ""
        results = {
            "benchmark": SECTION, "command": command, "note": args.note,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": git_commit(), "machine": info, "corpus": corpus,
            "model": SMOKE_MODEL if args.smoke else MODEL,
            "steps": SMOKE_STEPS if args.smoke else STEPS, "target": TARGET,
            "runs": runs, "failures": failures,
            "runtime_seconds": time.perf_counter() - started,
        }  # fmt: skip
        rows = table_rows(results)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print()
        for row in rows:
            print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        print()
        print("\n".join(check_lines(results)))
        if not args.smoke:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            write_markdown(args.markdown, markdown_section(results), SECTION)
            print(f"wrote {args.results} and the {SECTION} section of {args.markdown}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
