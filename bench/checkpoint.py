"""Benchmark the checkpoint stall: `trainer.async_checkpoint=true` against checkpoints written in
the foreground, on the same model, data and ranks, in one run.

1. Data: the Python standard library built by `kiln data` (or `--data DIR`).
2. Runs: `kiln train` of `tiny_decoder` widened to d_model 512, 8 layers, d_ff 2048 (about 35M
   parameters: 0.42 GB of weights and AdamW moments in fp32 per checkpoint), sequences of 64,
   global batch 8, `trainer.checkpoint_every=3` over 12 steps: checkpoints at steps 3, 6 and 9
   in the foreground or the background (the run's last, at step 12, is always written in the
   foreground), under `engine=ddp` at 1 rank (rank 0 writes everything) and `engine=fsdp` at 2
   ranks (each rank writes its shards through torch.distributed.checkpoint; async_save in the
   background).
3. Figures, from metrics.jsonl: the stall = the mean of the `seconds` of the checkpoint events
   at steps 3, 6 and 9 (how long the loop stopped for each save: a foreground write, or a copy
   into host memory); the loop's time = from the step-1 record to the step-12 record (what the
   whole run lost or kept, with the writer's thread sharing this machine's cores).

Target: background stall <= 0.25 x the foreground stall, at each engine. The loop's time is
listed beside it without one: on this 2-core machine the writer competes with training for the
cores, which a GPU run does not. `--repeat K` runs K interleaved rounds and keeps each figure's
best. Prints a table, writes bench/results/checkpoint.json and replaces its section of
BENCHMARKS.md (`--smoke`: a small corpus and model, prints only). A missed target prints FAIL;
the exit code stays 0 (non-zero only on a crash).

    .venv/bin/python bench/checkpoint.py [--data DIR] [--repeat K] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, machine, marks, write_markdown  # noqa: E402
from bench.trainer import build_data, call, threads_env, usable_cores, vocab_size  # noqa: E402

SECTION = "checkpoint"
START_MARK, END_MARK = marks(SECTION)
TARGET = 0.25  # background stall <= 0.25 x the foreground one
ENGINES = (("ddp", 1), ("fsdp", 2))
STEPS, EVERY = 12, 3
MODEL = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8",
         "model.d_ff=2048"]  # fmt: skip
SMOKE_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
               "model.d_ff=128"]  # fmt: skip


def overrides(data_dir: Path, run_dir: Path, engine: str, ranks: int, background: bool,
              smoke: bool) -> list[str]:  # fmt: skip
    return [
        "model=tiny_decoder", f"model.vocab_size={vocab_size(data_dir)}",
        *(SMOKE_MODEL if smoke else MODEL), "model.max_seq_len=64", "objective=clm",
        f"engine={engine}", "cluster=local_cpu", f"cluster.gpus_per_node={ranks}",
        f"data.path={data_dir}", "data.seq_len=64", "data.global_batch_size=8",
        "data.micro_batch_size=4", "data.num_workers=0", "logger=none", "logger.log_every=1",
        f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={EVERY}",
        "trainer.keep_checkpoints=5", "trainer.eval_every=0", "trainer.resume=none",
        "trainer.sample_tokens=0", f"trainer.async_checkpoint={str(background).lower()}",
        f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def run(data_dir: Path, work: Path, engine: str, ranks: int, background: bool,
        smoke: bool) -> dict[str, Any]:  # fmt: skip
    name = f"{engine}-{ranks}-{'background' if background else 'foreground'}"
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    threads = usable_cores() if ranks == 1 else 1
    call([sys.executable, "-m", "launch.cli", "train",
          *overrides(data_dir, run_dir, engine, ranks, background, smoke)],
         work / f"{name}.log", threads_env(threads))  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = {r["step"]: r for r in rows if r.get("event") == "checkpoint"}
    train = {r["step"]: r["time"] for r in rows if r.get("kind") == "train"}
    middle = [saves[s] for s in range(EVERY, STEPS, EVERY)]
    if any(s["background"] != background for s in middle) or saves[STEPS]["background"]:
        raise RuntimeError(f"{name}: the checkpoints were not written as asked: {saves}")
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints" / f"step_{EVERY:08d}").rglob("*")
               if f.is_file())  # fmt: skip
    return {
        "stall_s": statistics.mean(s["seconds"] for s in middle),
        "final_s": saves[STEPS]["seconds"],
        "loop_s": train[STEPS] - train[1],
        "checkpoint_gb": size / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `kiln data` output directory to reuse")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds, best of them")
    p.add_argument("--smoke", action="store_true", help="small corpus and model; print only")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeat = 1
    started = time.perf_counter()
    info = machine(("torch",))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-checkpoint-"))
    print(f"bench checkpoint: {args.repeat} round(s), in {work}")
    try:
        data_dir = args.data.resolve() if args.data else work / "data"
        if not args.data:
            build_data(data_dir, args.smoke)
        rounds: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.repeat):
            print(f"  round {round_ + 1}/{args.repeat} ...", flush=True)
            for engine, ranks in ENGINES:
                for background in (False, True):
                    key = f"{engine}/{'background' if background else 'foreground'}"
                    figures = run(data_dir, work, engine, ranks, background, args.smoke)
                    print(f"    {key}: stall {figures['stall_s'] * 1e3:.0f} ms, loop "
                          f"{figures['loop_s']:.1f} s", flush=True)  # fmt: skip
                    rounds.setdefault(key, []).append(figures)
        best = {key: {k: min(r[k] for r in runs) for k in runs[0]} for key, runs in rounds.items()}
        results: dict[str, Any] = {
            "benchmark": SECTION,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": git_commit(),
            "command": "bench/checkpoint.py" + (" --smoke" if args.smoke else ""),
            "machine": info,
            "rounds": rounds,
            "best": best,
            "target": TARGET,
        }
        lines, rows = [], []
        for engine, ranks in ENGINES:
            fg, bg = best[f"{engine}/foreground"], best[f"{engine}/background"]
            ratio = bg["stall_s"] / fg["stall_s"]
            verdict = "PASS" if ratio <= TARGET else "FAIL"
            lines.append(
                f"{engine} at {ranks} rank(s): background stall / foreground stall "
                f"{bg['stall_s'] * 1e3:.0f} / {fg['stall_s'] * 1e3:.0f} ms = {ratio:.3f}x, "
                f"target <= {TARGET:.2f}x: {verdict}"
            )
            for mode, f in (("foreground", fg), ("background", bg)):
                rows.append(f"| {engine} | {ranks} | {mode} | {f['checkpoint_gb']:.2f} | "
                            f"{f['stall_s'] * 1e3:.0f} | {f['final_s'] * 1e3:.0f} | "
                            f"{f['loop_s']:.2f} |")  # fmt: skip
            lines.append(
                f"{engine} at {ranks} rank(s): the 12-step loop with background / foreground "
                f"saves {bg['loop_s']:.2f} / {fg['loop_s']:.2f} s = "
                f"{bg['loop_s'] / fg['loop_s']:.3f}x (no target: the writer shares these cores)"
            )
        results["lines"] = lines
        results["runtime_seconds"] = time.perf_counter() - started
        header = ["| engine | ranks | checkpoints | GB per checkpoint | stall ms (steps 3, 6, 9) |"
                  " last save ms (foreground) | steps 1-12 s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        print("\n".join(header + rows + [""] + lines))
        if not args.smoke:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            m = info
            section = "\n".join([
                START_MARK,
                "## Checkpoints: the loop's stall, written in the background vs the foreground",
                "",
                f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
                f"{results['runtime_seconds']:.0f} s.",
                "",
                f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
                f"{m['ram_gib']} GiB RAM, {m['os']}; Python {m['python']}, torch {m['torch']}.",
                "- `kiln train` of `tiny_decoder` widened to d_model 512, 8 layers, d_ff 2048 "
                "(fp32 weights and AdamW moments), 12 steps of 8 x 64 tokens, checkpoints at "
                "steps 3, 6, 9 (`trainer.async_checkpoint` false or true) and 12 (always in the "
                "foreground); stall = the mean `seconds` of the checkpoint events at steps 3, 6 "
                "and 9 in metrics.jsonl; best of "
                f"{args.repeat} interleaved round(s).",
                "",
                *header, *rows, "",
                *[f"- {line}" for line in lines],
                "",
                END_MARK,
            ])  # fmt: skip
            write_markdown(args.markdown, section, SECTION)
            print(f"wrote {args.results} and the {SECTION} section of {args.markdown}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
