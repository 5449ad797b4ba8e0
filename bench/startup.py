"""Benchmark building a model at start-up: initialised from the seed against built empty, for
the same preset, in one process.

1. Seeded: `build_model(cfg)` on the CPU, as every DDP and ZeRO-1/2 rank of a new run does, and
   rank 0 alone under FSDP2 and ZeRO-3 (torch's default init of each layer, then the family's
   own recipe: every weight is drawn twice).
2. Empty: `empty_model(cfg, "cpu")`, what a resumed run, a run with `trainer.init_from`, the
   end-of-run consolidation and `kiln export` build: on the meta device, then allocated, its
   buffers computed; no draw.
3. Meta: `build_model(cfg)` under `torch.device("meta")`, what every FSDP2 rank builds before
   `fully_shard` allocates its shards.

After one untimed round of tiny_decoder (the first meta build imports half a second of
torch), each figure is the best of `--repeat` interleaved rounds, on every usable core (the values do not
depend on the thread count). Target: empty <= 0.05 x seeded at every preset (a resumed run
starts without the init's minutes). Prints a table, writes bench/results/startup.json and
replaces its section of BENCHMARKS.md (`--smoke`: tiny_decoder, one round, prints only). A
missed target prints FAIL; the exit code stays 0 (non-zero only on a crash).

    .venv/bin/python bench/startup.py [--models gpt2_350m,llama_1b] [--repeat K] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "startup"
START_MARK, END_MARK = marks(SECTION)
TARGET = 0.05  # empty build <= 0.05 x the seeded one
MODELS = ("gpt2_350m", "llama_1b")
OBJECTIVES = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}


def model_config(preset: str) -> Any:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from pretrain.config import build_config, register_configs

    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        schema = OmegaConf.get_type(compose("plan", overrides=[f"model={preset}"]).model)
        family = schema.family  # the config class's family (decoder, encoder, ...)
        overrides = [f"model={preset}", f"objective={OBJECTIVES[family]}", "data=small"]
        return build_config(compose("plan", overrides=overrides)).model


def timed(build: Any) -> tuple[float, int]:
    """Seconds `build()` takes, and the parameter count of what it built (freed after)."""
    gc.collect()
    start = time.perf_counter()
    model = build()
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return seconds, count


def measure(cfg: Any) -> dict[str, float]:
    import torch

    from pretrain.models import build_model, empty_model

    def seeded() -> Any:
        torch.manual_seed(0)
        return build_model(cfg)

    def meta() -> Any:
        with torch.device("meta"):
            return build_model(cfg)

    figures: dict[str, float] = {}
    for name, build in (("seeded", seeded), ("empty", lambda: empty_model(cfg, "cpu")),
                        ("meta", meta)):  # fmt: skip
        figures[f"{name}_s"], figures["parameters"] = timed(build)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="model presets, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds, best of them")
    p.add_argument("--smoke", action="store_true", help="tiny_decoder, one round; print only")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "startup.json")
    args = p.parse_args(argv)
    models = ["tiny_decoder"] if args.smoke else args.models.split(",")
    repeat = 1 if args.smoke else args.repeat
    import torch

    from bench.trainer import usable_cores

    torch.set_num_threads(usable_cores())
    started = time.perf_counter()
    info = machine(("torch",))
    print(f"bench startup: {models}, {repeat} round(s), {torch.get_num_threads()} threads")
    configs = {name: model_config(name) for name in models}
    measure(model_config("tiny_decoder"))  # untimed: the first meta build imports torch._refs
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for round_ in range(repeat):
        for name, cfg in configs.items():
            figures = measure(cfg)
            rounds[name].append(figures)
            print(f"  round {round_ + 1}/{repeat} {name}: seeded {figures['seeded_s']:.2f} s, "
                  f"empty {figures['empty_s']:.3f} s, meta {figures['meta_s']:.3f} s", flush=True)  # fmt: skip
    best = {name: {key: min(r[key] for r in runs) for key in runs[0]}
            for name, runs in rounds.items()}  # fmt: skip
    rows, lines = [], []
    for name, f in best.items():
        ratio = f["empty_s"] / f["seeded_s"]
        rows.append(f"| {name} | {f['parameters'] / 1e6:,.1f}M | {f['seeded_s']:.2f} | "
                    f"{f['empty_s']:.3f} | {f['meta_s']:.3f} | "
                    f"{f['parameters'] / f['seeded_s'] / 1e6:.0f} |")  # fmt: skip
        lines.append(f"{name}: empty / seeded build {f['empty_s']:.3f} / {f['seeded_s']:.2f} s = "
                     f"{ratio:.4f}x, target <= {TARGET:.2f}x: "
                     f"{'PASS' if ratio <= TARGET else 'FAIL'}")  # fmt: skip
    header = ["| model | parameters | seeded build s | empty build s | meta build s |"
              " seeded M params / s |", "|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(header + rows + [""] + lines))
    results = {
        "benchmark": SECTION,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git_commit(),
        "command": "bench/startup.py" + (f" --models {args.models}" if args.models != ",".join(
            MODELS) else ""),
        "machine": info,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "best": best,
        "target": TARGET,
        "lines": lines,
        "runtime_seconds": time.perf_counter() - started,
    }  # fmt: skip
    if args.smoke:
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    m = info
    last = best[models[-1]]
    rate = last["parameters"] / last["seeded_s"]
    section = "\n".join([
        START_MARK,
        "## Start-up: building the model seeded vs empty",
        "",
        f"`{results['command']}`, {results['date']}, commit {results['commit']}, "
        f"{results['runtime_seconds']:.0f} s.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_gib']} GiB RAM, {m['os']}; Python {m['python']}, torch {m['torch']}; "
        f"{results['threads']} threads.",
        "- Seeded = `build_model` on the CPU, fp32 (a new run: every DDP and ZeRO-1/2 rank, "
        "rank 0 alone under FSDP2 and ZeRO-3); empty = `empty_model` (a resumed run, "
        "`trainer.init_from`, the end-of-run consolidation, `kiln export`: built on the meta "
        "device, allocated, buffers computed); meta = `build_model` on the meta device (every "
        f"FSDP2 rank before `fully_shard`). Best of {repeat} interleaved round(s).",
        "- Seeded throughput is what rank 0 of a sharded run spends before the first step: at "
        f"the last preset's {rate / 1e6:.0f}M parameters/s, a 46.7B MoE (mixtral_8x7b) would "
        f"take {46.7e9 / rate / 60:.0f} minutes on these cores (more than NCCL's 10-minute "
        "timeout: the other ranks wait for it on a gloo group with a 2-hour timeout); a "
        "resumed run skips it.",
        "",
        *header, *rows, "",
        *[f"- {line}" for line in lines],
        "",
        END_MARK,
    ])  # fmt: skip
    write_markdown(args.markdown, section, SECTION)
    print(f"wrote {args.results} and the {SECTION} section of {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
