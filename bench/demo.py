"""`make demo`'s wall time against issue #6's target, and that its loss falls.

Runs the demo's three commands (`kiln data experiment=demo`, `kiln train experiment=demo`,
`kiln report experiment=demo report.run_dir=out/demo/run`), each timed, in a temporary copy of
the paths they write (`output_dir`, `trainer.run_dir`), with the W&B logger offline. Target
(issue #6): the whole demo in at most 10 minutes on a 2-core machine; the loss falls (mean of
the last 10 logged train losses below the first one). Prints, writes bench/results/demo.json
and the `demo` section of BENCHMARKS.md (`--smoke`: 20 steps, prints only). A missed target
prints FAIL (exit code 0); a failed command gives exit code 1.

    .venv/bin/python bench/demo.py [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
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

SECTION = "demo"
START_MARK, END_MARK = marks(SECTION)
TARGET_SECONDS = 600.0  # issue #6: `make demo` within 10 minutes on 2 cores
TARGET_CORES = 2


def kiln(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *args]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="20 training steps; prints only")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "demo.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = machine(("torch",))
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-demo-"))
    data, run_dir = work / "data", work / "run"
    extra = ["trainer.max_steps=20", "trainer.eval_every=10"] if args.smoke else []
    commands = {
        "kiln data": kiln("data", "experiment=demo", f"output_dir={data}"),
        "kiln train": kiln(
            "train", "experiment=demo", f"output_dir={data}", f"trainer.run_dir={run_dir}", *extra
        ),  # fmt: skip
        "kiln report": kiln(
            "report", "experiment=demo", f"output_dir={data}", f"report.run_dir={run_dir}"
        ),  # fmt: skip
    }
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    stages: dict[str, float] = {}
    failed = None
    try:
        for name, command in commands.items():
            print(f"  {name} ...", flush=True)
            start = time.perf_counter()
            log = work / f"{name.replace(' ', '-')}.log"
            with open(log, "w") as handle:
                code = subprocess.call(command, cwd=work, stdout=handle,
                                       stderr=subprocess.STDOUT, env=env)  # fmt: skip
            stages[name] = time.perf_counter() - start
            print(f"    {stages[name]:.1f} s", flush=True)
            if code != 0:
                failed = f"{name} exited with {code}: {log.read_text(errors='replace')[-2000:]}"
                print(failed)
                break
        records = []
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
        losses = [r["loss"] for r in records if r.get("kind") == "train"]
        evals = [r["eval_loss"] for r in records if r.get("kind") == "eval"]
        total = sum(stages.values())
        last = sum(losses[-10:]) / len(losses[-10:]) if losses else None
        results: dict[str, Any] = {
            "benchmark": SECTION,
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": git_commit(),
            "command": "bench/demo.py" + (" --smoke" if args.smoke else ""),
            "machine": info,
            "stages": stages,
            "total_seconds": total,
            "steps": len(losses),
            "loss_first": losses[0] if losses else None,
            "loss_last10_mean": last,
            "eval_losses": evals,
            "failed": failed,
            "target_seconds": TARGET_SECONDS,
        }
        time_ok = failed is None and total <= TARGET_SECONDS
        loss_ok = bool(losses) and last is not None and last < losses[0]
        cores = info["usable_cores"]
        lines = [
            f"`make demo` wall time: {total:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
            + f") on {cores} usable core(s), target <= {TARGET_SECONDS:.0f} s on "
            f"{TARGET_CORES} cores: {'PASS' if time_ok else 'FAIL'}"
            + ("" if cores == TARGET_CORES else " (not a 2-core machine)"),
            f"loss falls: first {losses[0] if losses else float('nan'):.3f}, mean of the last "
            f"{len(losses[-10:])} logged {last if last is not None else float('nan'):.3f} ({len(losses)} train records)"
            + (f", eval {' -> '.join(f'{x:.3f}' for x in evals)}" if evals else "")
            + f", target last < first: {'PASS' if loss_ok else 'FAIL'}",
        ]
        if failed:
            lines.append(f"FAILED: {failed.splitlines()[0]}")
        results["lines"] = lines
        results["runtime_seconds"] = time.perf_counter() - started
        print("\n".join(lines))
        if not args.smoke:
            m = info
            section = "\n".join(
                [
                    START_MARK,
                    "## Demo: `make demo` wall time",
                    "",
                    f"`{results['command']}`, {results['date']}, commit {results['commit']}.",
                    "",
                    f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
                    f"{m['ram_gib']} GiB RAM, {m['os']}; Python {m['python']}, torch "
                    f"{m['torch']}; load average before the run "
                    f"{', '.join(str(x) for x in m['load_average_before'])}.",
                    "- The three commands of `make demo` (`kiln data experiment=demo`, `kiln "
                    "train experiment=demo`, `kiln report experiment=demo`), timed one by one, "
                    "in a temporary directory, W&B offline; the venv is already installed "
                    "(the install step is not timed).",
                    *[f"- {line}" for line in lines],
                    "",
                    END_MARK,
                ]
            )
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            write_markdown(args.markdown, section + "\n", SECTION)
            print(f"wrote {args.results} and the {SECTION} section of {args.markdown}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
