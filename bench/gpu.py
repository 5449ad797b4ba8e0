"""Issue #9's GPU script: one short run on one H100/H200 through the full `kiln train` stack,
against a plain PyTorch loop over the same model, nanoGPT's figure and the device's own peak.

Stages, each timed, inside one wall-clock budget (`--budget`, default 480 s; a stage that no
longer fits is skipped and says so):

1. `env`: the device, torch, CUDA.
2. `matmul`: an 8192^3 bf16 matrix product (3 warm-up, 10 timed): the device's real peak.
3. `data`: shards on local disk built by `kiln data` (the Python standard library; or `--data
   DIR`, a `kiln data` output built earlier, e.g. where Ray is not installed).
4. `gpt2_124m`: `kiln train model=gpt2_124m objective=clm engine=ddp` on 1 GPU (`--engine`; the
   recorded H200 run used fsdp, before the DDP engine had bf16), batch 16 x 1024, bf16 autocast
   (FSDP2: its mixed-precision policy), `engine.compile=true`, `logger.log_every=1`: shards ->
   loader -> engine -> metrics.jsonl. Step time = median `step_time` after the warm-up steps
   (compilation is in the first ones); wall = the time between the records of those steps per
   step (what the loop does between steps included): tokens/s and MFU come from it; loader
   wait = median `data_wait`; peak memory = the last record's `memory_gib`
   (`torch.cuda.max_memory_allocated`).
5. `plain_124m`: a plain PyTorch loop (`--plain-worker`, its own process) over the same model
   built from the trainer run's resolved config: `build_model`, the forward (bf16 autocast)
   and the fp32 cross-entropy compiled as one function (as nanoGPT's model computes its loss in
   its compiled forward), fused AdamW, `clip_grad_norm_`, one micro-batch of the trainer's
   loader already on the GPU; the same batch and the same step timing (a host sync per step,
   as the trainer's `float(loss)`); wall = the mean of its timed steps.
6. `gpt2_350m`: the trainer at gpt2_350m, same settings.
7. `moe`: the trainer on the `tiny_moe` preset widened to GPT-2-small shape (`MOE_SHAPE`:
   12 layers, d 768, 8 experts top-2) at 16 x 1024.
8. `gpt2_124m_blocks` (engine=ddp only): `gpt2_124m` again with `engine.compile_scope=blocks`
   (each block's forward and the cross-entropy compiled apart: FSDP2's and DeepSpeed's scope),
   against compiling the forward with the loss (`compile_scope=loss`, DDP's default).
9. Only when asked (`--extra NAME,...`, after the rest): compile settings to try on a GPU,
   each reported as its tokens/s over the run it varies (`EXTRA_RUNS`: `gpt2_124m_autotune`
   and `gpt2_350m_autotune`, `engine.compile_mode=max-autotune-no-cudagraphs`;
   `gpt2_124m_cudagraphs`, `engine.compile_mode=reduce-overhead`; `gpt2_124m_cudnn` and
   `gpt2_124m_docmask_cudnn`, `engine.attention_backends=[cudnn,flash,efficient,math]`;
   `gpt2_124m_max`, max-autotune (CUDA graphs included) with cuDNN's attention first;
   `gpt2_124m_fsdp`, `engine=fsdp` (the engine of the first recorded run, whose
   cross-entropy was eager); `moe_loop`, `model.moe.grouped_gemm=false`: the experts as a
   loop, the grouped GEMM's before; `gpt2_124m_chunked` and `gpt2_124m_fsdp_chunked`,
   `engine.loss_chunk_tokens=2048`: the head and the cross-entropy an eighth of the batch's
   tokens at a time, against `gpt2_124m` and `gpt2_124m_fsdp`; `gpt2_124m_float8` and
   `gpt2_350m_float8`, `engine.float8=true`: the blocks' linear layers as FP8 matmuls through
   torchao, whose wheel must then be on the machine, against their bf16 runs;
   `gpt2_124m_fp8_max`, FP8 with autotuned kernels and cuDNN's attention first).

The runs in `--profile` (default gpt2_124m and gpt2_350m) take 4 more steps after the timed ones
(the profiler's warm-up step and 3 recorded) under `trainer.profile` (pretrain/profiling.py): their top kernels, the device's busy fraction
and the loop's parts go into the results and the section (`--traces DIR` keeps the traces).

For every trainer run, `kiln plan` with the same overrides gives the engine's memory estimate
(weights + gradients + optimizer + buffers + activations); ratio = measured / plan.

Targets (issue #9): 124M full stack >= 1.2 x nanoGPT's 478,600 tokens/s (H200,
../shared/REFERENCE.md); full stack >= 0.95 x the plain loop; MFU >= 50% at 350M (against
989 TFLOP/s); plan's memory within 15% of the measured peak. Each is printed with PASS/FAIL
(FAIL keeps the exit code 0; a crashed stage gives exit code 1). MFU is also given against
the measured matmul peak.

Writes bench/results/gpu.json (`--results`; rewritten after every stage, so a run cut short
keeps what it measured) and the `gpu` section of BENCHMARKS.md (`--markdown`), which sets every
run beside its counterpart in `--before` (default: the recorded H200 run from before the
trainer's speed-ups). `--render JSON...` rewrites the section from results files (e.g. fetched
from the GPU machine; several calls on one device are merged). On a host with only PyTorch,
`bench/gpu_bundle.py` packs what this script needs.

`--smoke` runs the same stages on the CPU in seconds (tiny models, a few steps, no compile, a
256^3 fp32 matmul): figures are meaningless there, the point is that every stage still runs;
it writes only `--results` when given. tests/bench/test_gpu_smoke.py runs it in CI, and
`--check` (no training: every GPU stage's own overrides through `kiln plan` on the CPU).

    python bench/gpu.py [--data DIR] [--budget 480] [--steps 40] [--skip moe,...]
    python bench/gpu.py --extra gpt2_124m_autotune,gpt2_124m_cudagraphs --skip moe
    python bench/gpu.py --smoke --results /tmp/gpu-smoke.json
    python bench/gpu.py --render bench/results/gpu.json [more.json ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Run as a script, Python puts bench/ first on sys.path, where bench/data_pipeline.py would
# shadow the `data_pipeline` package: drop bench/ and put the repository first.
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, machine, marks, write_markdown  # noqa: E402

SECTION = "gpu"
START_MARK, END_MARK = marks(SECTION)
PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM datasheet (the MFU denominator of kiln plan)
NANOGPT_TOKENS_PER_S = 478_600  # nanoGPT bench.py, 124M, 16 x 1024, compile, H200 (REFERENCE.md)
TARGET_VS_NANOGPT = 1.2
TARGET_VS_PLAIN = 0.95
TARGET_MFU_350M = 0.50
TARGET_MEMORY = 0.15  # |measured / plan - 1|
DEFAULT_BUDGET = 480.0  # seconds, the whole script (issue #9: at most 8 minutes)
DEFAULT_STEPS, DEFAULT_WARMUP = 40, 10
SMOKE_STEPS, SMOKE_WARMUP = 6, 2
BATCH, SEQ = 16, 1024
SMOKE_BATCH, SMOKE_SEQ = 4, 64
SMOKE_DATA = ["corpus.sources.0.paths=[stdlib/json]", "tokenizer.vocab_size=1000"]
# The MoE preset (tiny_moe: 4 experts top-2, d 64) widened to GPT-2-small shape for one GPU.
MOE_SHAPE = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=4",
             "model.d_ff=1536", "model.vocab_size=50304", "model.max_seq_len=1024",
             "model.moe.n_experts=8", "model.moe.top_k=2"]  # fmt: skip
# Smoke: every preset shrunk to a few hundred thousand parameters, the tokenizer's vocabulary.
SMOKE_SHAPE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=256",
               "model.max_seq_len=64"]  # fmt: skip
SMOKE_MOE_SHAPE = ["model.max_seq_len=64"]
# The earliest a stage may start: its rough cost on an H200 (start-up + compile + steps); a
# stage that would not fit in what is left of the budget is skipped, not cut short.
MIN_SECONDS = {"gpt2_124m": 60, "plain_124m": 45, "gpt2_350m": 75, "gpt2_124m_docmask": 50,
               "plain_124m_docmask": 45, "moe": 60, "gpt2_124m_blocks": 50,
               "gpt2_124m_autotune": 120, "gpt2_124m_cudagraphs": 60,
               "gpt2_350m_autotune": 150, "gpt2_124m_cudnn": 50,
               "gpt2_124m_docmask_cudnn": 50, "moe_loop": 90, "gpt2_124m_max": 120,
               "gpt2_124m_fsdp": 60, "gpt2_124m_chunked": 60,
               "gpt2_124m_fsdp_chunked": 60, "gpt2_124m_float8": 70,
               "gpt2_350m_float8": 90, "gpt2_124m_fp8_max": 150}  # fmt: skip
MAX_STAGE_SECONDS = 240.0  # one trainer or plain-loop run, compilation included
# The recorded H200 run before the trainer's speed-ups (issue #9's "before"): a run's section
# compares its figures with this one's, run by run (`--before`).
BEFORE_RESULTS = HERE / "results" / "gpu_h200_2026-11-28.json"
DEFAULT_PROFILE = "gpt2_124m,gpt2_350m"  # trainer runs profiled after their timed steps
PROFILE_STEPS = 3


class Budget:
    """The script's wall-clock budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class StageError(RuntimeError):
    pass


def run_logged(command: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
               ) -> float:  # fmt: skip
    """Run `command` in the repository, output to `log`; wall seconds. Raises StageError with
    the log's tail on a non-zero exit or a timeout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, timeout=max(1.0, timeout))  # fmt: skip
        except subprocess.TimeoutExpired:
            code = None
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        why = f"timed out after {timeout:.0f} s" if code is None else f"exited with {code}"
        raise StageError(f"`{' '.join(command[:4])} ...` {why}; log {log}:\n{tail}")
    return time.perf_counter() - start


def child_env() -> dict[str, str]:
    """The environment of the subprocesses: the repository importable (a fresh clone without
    `pip install -e .` works too), unbuffered output."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{path}" if path else str(REPO),
                PYTHONUNBUFFERED="1")  # fmt: skip


# --------------------------------------------------------------------------------------------
# stages


def stage_env(smoke: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    elif not smoke:
        raise StageError(
            "no CUDA device visible to torch (torch.cuda.is_available() is False); "
            "use --smoke to run the CPU smoke mode"
        )
    else:
        info["device"] = "cpu"
    for module in ("hydra", "omegaconf"):
        try:
            __import__(module)
        except ImportError as error:
            raise StageError(f"{module} is not importable ({error}): run `make install`, or put "
                             "hydra-core, omegaconf and antlr4-python3-runtime on PYTHONPATH "
                             "(bench/gpu_bundle.py)") from error  # fmt: skip
    info["packages"] = package_sources()
    return info


def package_sources() -> dict[str, dict[str, str | None]]:
    """Version and location of the packages a GPU host may lack (from a bundle, or not)."""
    import importlib.metadata
    import importlib.util

    found = {}
    for dist, module in (
        ("hydra-core", "hydra"),
        ("omegaconf", "omegaconf"),
        ("torchao", "torchao"),
    ):
        spec = importlib.util.find_spec(module)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        found[module] = {"version": version, "path": spec.origin if spec else None}
    return found


def stage_matmul(smoke: bool) -> dict[str, Any]:
    """TFLOP/s of a square matrix product: bf16 8192^3 on CUDA, fp32 256^3 on the CPU."""
    import torch

    cuda = torch.cuda.is_available() and not smoke
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (256, torch.float32, "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    iterations = 10
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "tflops": 2 * n**3 / seconds / 1e12}  # fmt: skip


def stage_data(args: argparse.Namespace, work: Path, budget: Budget) -> dict[str, Any]:
    """The shards: `--data DIR`, or the stdlib built now by `kiln data`."""
    if args.data:
        out, seconds, built = args.data.resolve(), 0.0, False
    else:
        try:
            import ray  # noqa: F401
        except ImportError as error:
            raise StageError("`kiln data` needs Ray, which is not installed here: build the shards "
                             "where it is (`kiln data output_dir=DIR`) and pass --data DIR") from error  # fmt: skip
        out = work / "data"
        overrides = [f"output_dir={out}", "overwrite=true", *(SMOKE_DATA if args.smoke else [])]
        command = [sys.executable, "-m", "launch.cli", "data", *overrides]
        seconds = run_logged(command, work / "kiln-data.log", budget.left(), child_env())
        built = True
    from data_pipeline.shards import read_manifest

    try:
        manifest = read_manifest(out)
    except Exception as error:  # noqa: BLE001 - reported as the stage's failure
        raise StageError(f"{out}: not a `kiln data` output ({error})") from error
    return {
        "path": str(out),
        "built_seconds": seconds,
        "built_here": built,
        "vocab_size": manifest.tokenizer.vocab_size,
        "manifest": "manifest.json",
    }


NO_MASK = ["data.document_masking=false", "data.reset_position_ids=false"]
CUDNN_FIRST = "[cudnn,flash,efficient,math]"
# name -> (model, extra overrides). Without document masking the work is nanoGPT's (causal
# attention over the packed row, SDPA's flash kernel); `_docmask` is kiln's default
# (no attention across documents: an explicit mask, so SDPA cannot take its causal fast path).
TRAINER_RUNS: dict[str, tuple[str, list[str]]] = {
    "gpt2_124m": ("gpt2_124m", NO_MASK),
    "gpt2_350m": ("gpt2_350m", NO_MASK),
    "gpt2_124m_docmask": ("gpt2_124m", []),
    "moe": ("moe", []),
    # each block's forward and the cross-entropy compiled apart (what FSDP2 and DeepSpeed
    # compile), against the forward compiled whole with the loss
    "gpt2_124m_blocks": ("gpt2_124m", [*NO_MASK, "engine.compile_scope=blocks"]),
}
PLAIN_RUNS = {"plain_124m": "gpt2_124m", "plain_124m_docmask": "gpt2_124m_docmask"}
ORDER = ["gpt2_124m", "plain_124m", "gpt2_350m", "gpt2_124m_docmask", "plain_124m_docmask", "moe",
         "gpt2_124m_blocks"]  # fmt: skip
# stages that only mean something with the DDP engine (the others compile blocks anyway)
DDP_ONLY = {"gpt2_124m_blocks"}
# Run only when asked (`--extra a,b`), after the others: compile settings to try on a GPU.
EXTRA_RUNS: dict[str, tuple[str, list[str]]] = {
    # autotuned matmul and attention kernels (longer compilation)
    "gpt2_124m_autotune": (
        "gpt2_124m",
        [*NO_MASK, "engine.compile_mode=max-autotune-no-cudagraphs"],
    ),
    # CUDA graphs: one launch per graph instead of one per kernel
    "gpt2_124m_cudagraphs": ("gpt2_124m", [*NO_MASK, "engine.compile_mode=reduce-overhead"]),
    "gpt2_350m_autotune": (
        "gpt2_350m",
        [*NO_MASK, "engine.compile_mode=max-autotune-no-cudagraphs"],
    ),
    # cuDNN's attention first (Hopper), then torch's usual order
    "gpt2_124m_cudnn": ("gpt2_124m", [*NO_MASK, f"engine.attention_backends={CUDNN_FIRST}"]),
    "gpt2_124m_docmask_cudnn": ("gpt2_124m", [f"engine.attention_backends={CUDNN_FIRST}"]),
    # everything above at once: autotuned kernels, CUDA graphs, cuDNN's attention first
    "gpt2_124m_max": (
        "gpt2_124m",
        [*NO_MASK, "engine.compile_mode=max-autotune", f"engine.attention_backends={CUDNN_FIRST}"],
    ),
    # FSDP2 on one GPU (each block and the cross-entropy compiled apart), the engine of the
    # first recorded H200 run, whose cross-entropy was eager
    "gpt2_124m_fsdp": ("gpt2_124m", [*NO_MASK, "engine=fsdp"]),
    # the MoE experts as a loop over experts (host sync per layer): the grouped GEMM's before
    "moe_loop": ("moe", ["model.moe.grouped_gemm=false"]),
    # the head and cross-entropy 2048 tokens at a time (engine.loss_chunk_tokens): the
    # (16 x 1024 x 50304) logits never whole; compiled with the forward (DDP), and eager
    # after compiled blocks (FSDP2)
    "gpt2_124m_chunked": ("gpt2_124m", [*NO_MASK, "engine.loss_chunk_tokens=2048"]),
    "gpt2_124m_fsdp_chunked": (
        "gpt2_124m",
        [*NO_MASK, "engine=fsdp", "engine.loss_chunk_tokens=2048"],
    ),
    # the blocks' linear layers as FP8 matmuls (engine.float8, torchao, tensorwise scales)
    "gpt2_124m_float8": ("gpt2_124m", [*NO_MASK, "engine.float8=true"]),
    "gpt2_350m_float8": ("gpt2_350m", [*NO_MASK, "engine.float8=true"]),
    # the levers together: FP8 matmuls, autotuned kernels, cuDNN's attention first
    "gpt2_124m_fp8_max": (
        "gpt2_124m",
        [
            *NO_MASK,
            "engine.float8=true",
            "engine.compile_mode=max-autotune-no-cudagraphs",
            f"engine.attention_backends={CUDNN_FIRST}",
        ],
    ),  # fmt: skip
}
# the run each extra one is compared with (default: its model's run)
EXTRA_VERSUS = {"gpt2_124m_docmask_cudnn": "gpt2_124m_docmask",
                "gpt2_124m_fsdp_chunked": "gpt2_124m_fsdp"}  # fmt: skip
TRAINER_RUNS.update(EXTRA_RUNS)


def run_spec(name: str, smoke: bool, vocab: int) -> tuple[list[str], int, int]:
    """(model and data overrides, batch, seq) of a trainer run."""
    preset, extra = TRAINER_RUNS[name]
    if preset == "moe":
        model = ["model=tiny_moe", *(SMOKE_MOE_SHAPE if smoke else MOE_SHAPE)]
    else:
        model = [f"model={preset}", *(SMOKE_SHAPE if smoke else [])]
    if smoke:
        model.append(f"model.vocab_size={vocab}")
    return [*model, *extra], (SMOKE_BATCH if smoke else BATCH), (SMOKE_SEQ if smoke else SEQ)


def run_engine(model: list[str], default: str) -> str:
    """The engine a run names in its overrides (`engine=...`), else the script's."""
    named = [o.split("=", 1)[1] for o in model if o.startswith("engine=")]
    return named[-1] if named else default


def train_overrides(model: list[str], batch: int, seq: int, data_dir: Path, run_dir: Path,
                    steps: int, smoke: bool, engine: str) -> list[str]:  # fmt: skip
    cluster = ["cluster=local_cpu"] if smoke else ["cluster=local", "engine.precision=bf16"]
    engine = run_engine(model, engine)
    model = [o for o in model if not o.startswith("engine=")]
    return [
        *model, "objective=clm", f"engine={engine}", *cluster, "cluster.gpus_per_node=1",
        f"engine.compile={'false' if smoke else 'true'}", f"data.path={data_dir}",
        f"data.seq_len={seq}", f"data.global_batch_size={batch}", f"data.micro_batch_size={batch}",
        "logger=none", "logger.log_every=1", f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every={steps + 1}", "trainer.eval_every=0", "trainer.resume=none",
        "trainer.sample_tokens=8", f"trainer.run_dir={run_dir}",
    ]  # fmt: skip


def plan_json(overrides: list[str]) -> dict[str, Any]:
    """`kiln plan`'s JSON for these overrides, in this process: composed, validated and planned
    as `kiln plan` does, without a `kiln plan` process's start-up (Hydra's compose API)."""
    from hydra import compose, initialize_config_module

    from pretrain.config import build_config, register_configs
    from pretrain.plan import build_plan

    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        return build_plan(build_config(compose("plan", overrides=overrides))).to_json()


def plan_errors() -> tuple[type[BaseException], ...]:
    """What `plan_json` raises for a config that does not compose or validate."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pretrain.config import ConfigError

    return ConfigError, HydraException, OmegaConfBaseException


def plan_memory(overrides: list[str], strategy: str) -> dict[str, Any]:
    """`kiln plan` for the same overrides: the strategy's per-GPU estimate, in bytes."""
    try:
        plan = plan_json([o for o in overrides if not o.startswith("trainer.")])
    except plan_errors() as error:
        raise StageError(f"kiln plan: {' '.join(str(error).split())}") from error
    memory = plan["memory"][strategy]
    return {
        "strategy": strategy,
        "total_bytes": memory["total"],
        "model_states_bytes": memory["model_states"],
        "buffers_bytes": memory["buffers"],
        "activations_bytes": memory["activations"],
        "params_total": plan["model"]["params_total"],
        "params_active": plan["model"]["params_active"],
        "flops_per_token": plan["flops"]["per_token"],
    }


def stage_trainer(name: str, args: argparse.Namespace, data: dict[str, Any], work: Path,
                  budget: Budget) -> dict[str, Any]:  # fmt: skip
    """`kiln train` for one model: step figures from metrics.jsonl, plan's memory estimate."""
    model, batch, seq = run_spec(name, args.smoke, data["vocab_size"])
    run_dir = work / f"run-{name}"
    # a rerun in the same --work: a fresh run (kiln refuses trainer.resume=none over checkpoints)
    shutil.rmtree(run_dir, ignore_errors=True)
    profiled = name in args.profile_runs
    # the profiled steps, and the profiler's warm-up step before them, come after the timed
    # ones (the trainer flags them `profiled`; every figure but the profile leaves them out)
    steps = args.steps + (1 + PROFILE_STEPS if profiled else 0)
    overrides = train_overrides(model, batch, seq, Path(data["path"]), run_dir, steps,
                                args.smoke, args.engine)  # fmt: skip
    if profiled:
        overrides += [f"trainer.profile.start_step={args.steps + 2}",
                      f"trainer.profile.steps={PROFILE_STEPS}"]  # fmt: skip
    # plan's keys: zero0 (plain data parallel: DDP) .. zero3, fsdp
    engine = run_engine(model, args.engine)
    strategy = {"ddp": "zero0", "fsdp": "fsdp"}.get(engine, engine.removesuffix("_offload"))
    command = [sys.executable, "-m", "launch.cli", "train", *overrides]
    timeout = min(budget.left(), MAX_STAGE_SECONDS)
    # the plan is made on the host while the trainer starts up and compiles (its seconds are
    # the GPU's idle seconds otherwise; it ends long before the timed steps)
    with ThreadPoolExecutor(max_workers=1) as pool:
        planned = pool.submit(plan_memory, overrides, strategy)
        wall = run_logged(command, work / f"train-{name}.log", timeout, child_env())
        plan = planned.result()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r["step"])
    train = [r for r in train if not r.get("profiled")]
    if len(train) < args.steps:
        raise StageError(f"{run_dir}/metrics.jsonl: {len(train)} train records, {args.steps} asked")
    timed = train[args.warmup :]
    step_s = statistics.median(r["step_time"] for r in timed)
    wait_s = statistics.median(r["data_wait"] for r in timed)
    # the wall clock per timed step, from the records' times: what the loop does between steps
    # (logging, the all-reduced loss, signal checks) included, as a user's run pays it and as
    # nanoGPT's bench.py times its steps; the step times alone leave it out
    wall = (train[-1]["time"] - train[args.warmup - 1]["time"]) / (len(train) - args.warmup)
    tokens = batch * seq
    start = next((r for r in records if r.get("event") == "start"), {})
    peak_tflops = start.get("peak_tflops", PEAK_TFLOPS)
    measured_gib = train[-1]["memory_gib"]
    profile = next((r for r in records if r.get("event") == "profile"), None)
    if profiled and profile is None:
        raise StageError(f"{run_dir}/metrics.jsonl: no profile event (trainer.profile)")
    return {
        "name": name,
        "overrides": overrides,
        "batch": batch,
        "seq": seq,
        "steps": len(train),
        "warmup": args.warmup,
        "wall_seconds": wall,
        "first_step_seconds": train[0]["step_time"],
        "step_ms": 1e3 * step_s,
        "step_ms_mean": 1e3 * statistics.fmean(r["step_time"] for r in timed),
        "wall_ms": 1e3 * wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_median_step": tokens / step_s,
        "data_wait_ms": 1e3 * wait_s,
        "data_wait_fraction": wait_s / step_s,
        "mfu_logged": statistics.median(r["mfu"] for r in timed),
        "peak_tflops_logged": peak_tflops,
        "peak_memory_gib": measured_gib,
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "plan": plan,
        "config": str(run_dir / "config.pkl"),
        **({"profile": profile_result(profile)} if profile else {}),
    }


def skipped_stages(args: argparse.Namespace) -> set[str]:
    """`--skip`'s stage names, each checked (a misspelt one would otherwise run)."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := sorted(skip - {"matmul", "data", *TRAINER_RUNS, *PLAIN_RUNS}):
        parser().error(f"--skip: unknown stage(s) {unknown}; known: matmul, data, "
                       f"{', '.join([*ORDER, *EXTRA_RUNS])}")  # fmt: skip
    return skip


def check_stages(args: argparse.Namespace) -> int:
    """`--check`: every trainer stage's GPU overrides (the default runs and every extra, the
    profiled ones with their `trainer.profile` settings; `--skip` leaves some out) composed,
    validated and planned as `kiln plan` does, in this process, no training: a config that
    does not compose or validate fails here, not on the GPU."""
    work = Path(tempfile.gettempdir()) / "kiln-bench-gpu-check"  # named, never written
    steps = args.steps or DEFAULT_STEPS
    profiled = {s.strip() for s in args.profile.split(",") if s.strip()}

    def check(name: str) -> tuple[str, str | None, str]:
        model, batch, seq = run_spec(name, False, 0)
        total = steps + (1 + PROFILE_STEPS if name in profiled else 0)
        overrides = train_overrides(model, batch, seq, work / "data", work / f"run-{name}",
                                    total, False, args.engine)  # fmt: skip
        if name in profiled:
            overrides += [f"trainer.profile.start_step={steps + 2}",
                          f"trainer.profile.steps={PROFILE_STEPS}"]  # fmt: skip
        engine = run_engine(model, args.engine)
        strategy = {"ddp": "zero0", "fsdp": "fsdp"}.get(engine, engine.removesuffix("_offload"))
        try:
            memory = plan_json(overrides)["memory"][strategy]["total"]
        except (*plan_errors(), KeyError) as error:
            return name, " ".join(str(error).split())[:300], " ".join(overrides)
        return name, None, f"{strategy} {memory / 2**30:.2f} GiB"

    skip = skipped_stages(args)
    names = [n for n in TRAINER_RUNS
             if n not in skip and not (n in DDP_ONLY and args.engine != "ddp")]  # fmt: skip
    checked = [check(name) for name in names]
    for name, error, detail in checked:
        print(f"[gpu --check] {name}: {'FAILED: ' + error if error else 'ok, plan ' + detail}")
        if error:
            print(f"[gpu --check] {name}'s overrides: {detail}")
    failed = [name for name, error, _ in checked if error]
    print(f"[gpu --check] {len(checked) - len(failed)} of {len(checked)} stages resolve"
          + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


def profile_result(event: dict[str, Any]) -> dict[str, Any]:
    """What `trainer.profile` logged (its `profile` event), with the summary table's text."""
    summary = Path(event["summary"])
    return {
        "steps": f"{event['first_step']}-{event['step']}",
        "step_ms": event["step_ms"],
        "device_busy": event.get("device_busy"),
        "measure": event["profile/measure"],
        "regions_ms": event["profile/regions_ms"],
        "top": event["profile/top"],
        "summary": summary.read_text() if summary.is_file() else None,
    }


def stage_plain(name: str, trainer: dict[str, Any], args: argparse.Namespace, work: Path,
                budget: Budget) -> dict[str, Any]:  # fmt: skip
    """The plain loop (`--plain-worker`) in its own process, on the trainer run's model."""
    out = work / f"plain-{trainer['name']}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", trainer["config"],
               "--steps", str(args.steps), "--out", str(out)]  # fmt: skip
    if args.smoke:
        command.append("--smoke")
    timeout = min(budget.left(), MAX_STAGE_SECONDS)
    wall = run_logged(command, work / f"plain-{trainer['name']}.log", timeout, child_env())
    result = json.loads(out.read_text())
    timed = result["step_times"][args.warmup :]
    step_s = statistics.median(timed)
    tokens = trainer["batch"] * trainer["seq"]
    return {
        "name": name,
        "of": trainer["name"],
        "steps": len(result["step_times"]),
        "warmup": args.warmup,
        "wall_seconds": wall,
        "first_step_seconds": result["step_times"][0],
        "step_ms": 1e3 * step_s,
        # the loop does nothing between its timed steps: their mean is its wall clock per step
        "wall_ms": 1e3 * statistics.fmean(timed),
        "tokens_per_s": tokens / statistics.fmean(timed),
        "tokens_per_s_median_step": tokens / step_s,
        "peak_memory_gib": result["peak_memory_gib"],
        "loss_first": result["losses"][0],
        "loss_last": result["losses"][-1],
        "compile": result["compile"],
        "fused_adamw": result["fused_adamw"],
        "batch_keys": result["batch_keys"],
    }


def plain_worker(config_path: Path, steps: int, out: Path, smoke: bool) -> int:
    """A plain PyTorch loop over the trainer run's model: what a user would write."""
    import torch
    import torch.nn.functional as F

    from pretrain.models import build_model

    cfg = pickle.loads(config_path.read_bytes())  # noqa: S301 - written by our kiln train run
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg.model).to(device)
    optim = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                  eps=optim.eps, weight_decay=optim.weight_decay, fused=cuda)  # fmt: skip
    # one real micro-batch of the trainer's loader (the same keys: input ids, labels and, with
    # document masking, position and document ids), on the device once and reused every step
    from pretrain.data.loader import build_run_loader

    loader = build_run_loader(cfg, rank=0, world=1, num_steps=1)
    batch = {k: v.to(device) for k, v in next(iter(loader.loader)).items() if k != "index"}
    labels = batch.pop("labels")
    inputs = batch

    def forward_loss(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(**inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    # compiled with the loss, as nanoGPT's model computes its loss inside the compiled forward
    loss_fn = torch.compile(forward_loss) if cuda else forward_loss
    step_times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn(inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # the host sync, as the trainer's float(loss)
        step_times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    out.write_text(json.dumps({"step_times": step_times, "losses": losses, "compile": cuda,
                               "fused_adamw": cuda, "peak_memory_gib": peak,
                               "batch_keys": sorted(inputs)}) + "\n")  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# figures and targets


def derive(results: dict[str, Any]) -> None:
    """MFU of every run (against 989 TFLOP/s and the measured matmul peak), memory ratios, and
    the targets' verdicts, into `results`."""
    matmul = results["stages"].get("matmul", {}).get("result")
    measured_peak = matmul["tflops"] if matmul else None
    runs = results["runs"]
    for run in runs.values():
        flops = run.get("flops_per_token") or runs.get(run.get("of", ""), {}).get("plan", {}).get(
            "flops_per_token"
        )
        if "plan" in run:
            flops = run["plan"]["flops_per_token"]
            plan_gib = run["plan"]["total_bytes"] / 2**30
            run["plan_memory_gib"] = plan_gib
            run["memory_ratio"] = run["peak_memory_gib"] / plan_gib if plan_gib else None
        if flops:
            run["flops_per_token"] = flops
            achieved = run["tokens_per_s"] * flops / 1e12
            run["tflops"] = achieved
            run["mfu_989"] = achieved / PEAK_TFLOPS
            run["mfu_measured_peak"] = achieved / measured_peak if measured_peak else None
    checks = []

    def check(label: str, value: float | None, target: str, ok: bool | None) -> None:
        verdict = "n/a" if value is None or ok is None else ("PASS" if ok else "FAIL")
        checks.append({"label": label, "value": value, "target": target, "verdict": verdict})

    for name, label, target in (
        ("gpt2_124m", "no document masking, nanoGPT's work", TARGET_VS_NANOGPT),
        ("gpt2_124m_docmask", "document masking, kiln's default; no target", None),
    ):
        run = runs.get(name)
        value = run["tokens_per_s"] / NANOGPT_TOKENS_PER_S if run else None
        ok = None if value is None or target is None else value >= target
        shown = f">= {target:.2f}x" if target else "none"
        check(f"{name} full stack / nanoGPT's 478,600 tokens/s ({label})", value, shown, ok)
    for plain_name, trainer_name in PLAIN_RUNS.items():
        trainer, plain = runs.get(trainer_name), runs.get(plain_name)
        value = trainer["tokens_per_s"] / plain["tokens_per_s"] if trainer and plain else None
        check(f"{trainer_name} full stack / {plain_name} plain PyTorch loop (same batch)", value,
              f">= {TARGET_VS_PLAIN:.2f}x", None if value is None else value >= TARGET_VS_PLAIN)  # fmt: skip
    after, before = runs.get("gpt2_124m"), runs.get("gpt2_124m_blocks")
    value = after["tokens_per_s"] / before["tokens_per_s"] if after and before else None
    check("gpt2_124m: forward + cross-entropy compiled together (engine.compile_scope=loss, "
          "the default) / each block and the cross-entropy compiled apart (gpt2_124m_blocks)",
          value,
          "none (the speed-up's after / before)", None)  # fmt: skip
    t350 = runs.get("gpt2_350m")
    value = t350["mfu_989"] if t350 else None
    check("gpt2_350m full stack MFU vs 989 TFLOP/s", value, f">= {TARGET_MFU_350M:.0%}",
          None if value is None else value >= TARGET_MFU_350M)  # fmt: skip
    for name, (base, extra_overrides) in EXTRA_RUNS.items():
        base = EXTRA_VERSUS.get(name, base)
        run, before = runs.get(name), runs.get(base)
        if run is None:
            continue
        value = run["tokens_per_s"] / before["tokens_per_s"] if before else None
        tried = " ".join(o for o in extra_overrides if o not in NO_MASK)
        check(f"{name} ({tried}) / {base}: tokens/s", value, "none (a setting tried)", None)
    for name in TRAINER_RUNS:
        if name in EXTRA_RUNS and name not in runs:
            continue  # not asked for
        run = runs.get(name)
        ratio = run.get("memory_ratio") if run else None
        # on the CPU the trainer logs the process's peak RSS (interpreter included): no target
        ok = None if ratio is None or results["smoke"] else abs(ratio - 1) <= TARGET_MEMORY
        check(f"{name} peak memory / kiln plan's estimate", ratio,
              f"within {TARGET_MEMORY:.0%} (0.85x-1.15x)", ok)  # fmt: skip
    results["checks"] = checks


# --------------------------------------------------------------------------------------------
# report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def wall_ms(run: dict[str, Any]) -> float:
    """Wall-clock ms per timed step. Runs recorded before `wall_ms` existed: a trainer run's
    interval between records; a plain loop's step (nothing happens between its steps)."""
    return run.get("wall_ms") or run.get("interval_ms") or run["step_ms"]


def wall_tokens_per_s(run: dict[str, Any]) -> float:
    """Tokens/s over the wall clock (older results: from their between-records interval)."""
    if "wall_ms" in run:
        return run["tokens_per_s"]
    return run.get("tokens_per_s_between_steps") or run["tokens_per_s"]


def wall_mfu(run: dict[str, Any], key: str) -> float | None:
    """A run's MFU (`mfu_989` or `mfu_measured_peak`) over the wall clock: older results
    computed it from the median step, so it is scaled to their between-records tokens/s."""
    value = run.get(key)
    if value is None or "wall_ms" in run:
        return value
    return value * wall_tokens_per_s(run) / run["tokens_per_s"]


def predates_wall_clock(results: dict[str, Any]) -> bool:
    """Results of a `bench/gpu.py` from before tokens/s came from the wall clock (the recorded
    H200 run of 2026-11-28): its runs have no `wall_ms`."""
    return bool(results["runs"]) and not any("wall_ms" in r for r in results["runs"].values())


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [("run", "step ms (median)", "wall ms per step", "tokens/s (wall)", "MFU vs 989",
             "MFU vs measured peak",
             "loader wait ms (% of step)", "peak memory GiB", "plan GiB", "measured / plan",
             "first step s", "loss first -> last")]  # fmt: skip
    for run in results["runs"].values():
        wait = (
            f"{run['data_wait_ms']:.2f} ({run['data_wait_fraction']:.1%})"
            if "data_wait_ms" in run
            else "- (one batch kept on the GPU)"
        )
        rows.append(
            (
                run["name"],
                f"{run['step_ms']:.2f}",
                f"{wall_ms(run):.2f}",
                f"{wall_tokens_per_s(run):,.0f}",
                fmt(wall_mfu(run, "mfu_989"), ".1%"),
                fmt(wall_mfu(run, "mfu_measured_peak"), ".1%"),
                wait,
                f"{run['peak_memory_gib']:.2f}",
                fmt(run.get("plan_memory_gib"), ".2f"),
                fmt(run.get("memory_ratio"), ".3f"),
                f"{run['first_step_seconds']:.1f}",
                f"{run['loss_first']:.2f} -> {run['loss_last']:.2f}",
            )
        )
    return rows


def check_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for c in results["checks"]:
        value = c["value"]
        shown = (
            "-" if value is None else (f"{value:.1%}" if "MFU" in c["label"] else f"{value:.3f}x")
        )
        lines.append(f"{c['label']}: {shown}, target {c['target']}: {c['verdict']}")
    return lines


def stage_lines(results: dict[str, Any]) -> list[str]:
    parts = []
    for name, stage in results["stages"].items():
        text = f"{name} {stage['seconds']:.1f} s"
        if stage["status"] != "ok":
            text += f" ({stage['status']}{': ' + stage['error'].splitlines()[0] if stage.get('error') else ''})"
        parts.append(text)
    return [f"stages: {'; '.join(parts)}; total {results['runtime_seconds']:.0f} s of a "
            f"{results['budget_seconds']:.0f} s budget"]  # fmt: skip


def profile_lines(results: dict[str, Any]) -> list[str]:
    """Markdown: where each profiled run's step time went (kernels, device busy, loop parts)."""
    lines: list[str] = []
    for run in results["runs"].values():
        profile = run.get("profile")
        if not profile:
            continue
        busy = profile.get("device_busy")
        regions = ", ".join(f"`{k}` {v:.2f} ms" for k, v in profile["regions_ms"].items())
        lines += [
            "",
            f"**{run['name']}**, steps {profile['steps']} under `trainer.profile` (after the "
            f"timed steps): mean step {profile['step_ms']:.2f} ms with the profiler on"
            + (f"; device busy {busy:.1%} of it" if busy is not None else "")
            + f"; the loop's parts on the host: {regions}.",
            "",
            f"| top by {profile['measure']} | ms per step | calls per step | share |",
            "|---|---|---|---|",
        ]
        for entry in profile["top"]:
            name = entry["name"].replace("|", "\\|")
            name = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{name}` | {entry['ms_per_step']:.3f} | "
                         f"{entry['calls_per_step']:.0f} | {entry['share']:.1%} |")  # fmt: skip
    if lines:
        lines = ["### Where the step time goes", *lines]
    return lines


def print_report(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
    for line in [*check_lines(results), *stage_lines(results)]:
        print(line)
    for line in profile_lines(results):
        print(line)


PART_KEYS = ("command", "date", "commit", "runtime_seconds", "budget_seconds")
SAME_DEVICE_STAGES = ("env", "matmul", "data")  # measured once: the first part's are kept


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results files of one device (e.g. one call per device budget) as one: every
    part's runs (a later part's run of the same name replaces the earlier one), the first part's
    device, matmul and data stages, and each part's command, date and commit in `parts`."""
    merged = json.loads(json.dumps(parts[0]))  # a deep copy
    merged["parts"] = [{key: part.get(key) for key in PART_KEYS} for part in parts]
    for part in parts[1:]:
        for key in ("smoke", "steps", "warmup"):
            if part.get(key) != merged.get(key):
                raise ValueError(f"the parts differ in {key!r} ({merged.get(key)!r} and "
                                 f"{part.get(key)!r}): their figures are not comparable")  # fmt: skip
        for name, stage in part["stages"].items():
            kept = merged["stages"].get(name)
            if kept is not None and (name in SAME_DEVICE_STAGES or stage["status"] != "ok"):
                continue  # a later part skipped or lost what an earlier one measured
            merged["stages"][name] = stage
            if name in part["runs"]:
                merged["runs"][name] = part["runs"][name]
    merged["runtime_seconds"] = sum(p.get("runtime_seconds") or 0 for p in parts)
    merged["budget_seconds"] = sum(p.get("budget_seconds") or 0 for p in parts)
    merged["failed"] = any(p.get("failed") for p in parts)
    merged["partial"] = any(p.get("partial") for p in parts)
    return merged


def load_before(path: str | None, results: dict[str, Any]) -> dict[str, Any] | None:
    """The results to compare with (`--before`), unless none, the same run, or the other mode."""
    if not path or not Path(path).is_file():
        return None
    before = json.loads(Path(path).read_text())
    same = (before.get("date"), before.get("commit")) == (
        results.get("date"),
        results.get("commit"),
    )
    return None if same or before.get("smoke") != results.get("smoke") else before


def changed_overrides(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The trainer overrides `after` adds and `before` had that `after` dropped (the run
    directory, data path and step counts left out: they are not the work)."""

    def work(run: dict[str, Any]) -> list[str]:
        return [o for o in run.get("overrides", [])
                if not o.startswith(("trainer.", "data.path="))]  # fmt: skip

    old, new = work(before), work(after)
    return [o for o in new if o not in old], [o for o in old if o not in new]


def before_after_rows(results: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of `results` against its counterpart in `before`: the run of the same name,
    else the run an extra one varies, else its preset's run (`gpt2_124m_float8` -> `gpt2_124m`)."""
    rows = []
    old_runs = before["runs"]
    for name, run in results["runs"].items():
        candidates = [name, EXTRA_VERSUS.get(name), TRAINER_RUNS.get(name, ("",))[0]]
        base = next((c for c in candidates if c and c in old_runs), None)
        if base is None:
            continue
        old = old_runs[base]
        added, dropped = changed_overrides(old, run)
        rows.append({
            "before": base, "after": name, "added": added, "dropped": dropped,
            "tokens_per_s": (wall_tokens_per_s(old), wall_tokens_per_s(run)),
            "speedup": wall_tokens_per_s(run) / wall_tokens_per_s(old),
            "step_ms": (wall_ms(old), wall_ms(run)),
            "mfu_989": tuple(
                wall_tokens_per_s(r) * r["flops_per_token"] / 1e12 / PEAK_TFLOPS
                if r.get("flops_per_token") else None
                for r in (old, run)
            ),
            "peak_memory_gib": (old["peak_memory_gib"], run["peak_memory_gib"]),
            "memory_ratio": run["peak_memory_gib"] / old["peak_memory_gib"]
            if old["peak_memory_gib"] else None,
        })  # fmt: skip
    return rows


def before_after_lines(results: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """Markdown: this run against the recorded one, run by run (issue #9's before and after)."""
    rows = before_after_rows(results, before) if before else []
    if not rows:
        return []
    lines = [
        f"### Before and after: against the run of {before['date']} (commit {before['commit']})",
        "",
        "Each run here against its counterpart there (the same name, else the run it varies). "
        "Overrides: what this run sets that that one did not (and what that one set instead); "
        "the code changed between the commits too. Plain loops have no overrides: the loop "
        "itself is described above. Tokens/s over the wall clock of the timed steps (for a "
        "trainer run recorded before that figure: the interval between its records, the same "
        "measure) and the MFU they give.",
        "",
        "| before -> after | overrides added (dropped) | tokens/s (wall) before -> after | "
        "after / before | wall ms per step | MFU vs 989 | peak GiB (after / before) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        added = " ".join(f"`{o}`" for o in row["added"]) or "-"
        if row["dropped"]:
            added += " (" + " ".join(f"`{o}`" for o in row["dropped"]) + ")"
        ratio = f" ({row['memory_ratio']:.3f}x)" if row["memory_ratio"] else ""
        (t0, t1), (s0, s1), (m0, m1), (g0, g1) = (
            row[k] for k in ("tokens_per_s", "step_ms", "mfu_989", "peak_memory_gib")
        )
        lines.append(
            f"| {row['before']} -> {row['after']} | {added} | {t0:,.0f} -> {t1:,.0f} | "
            f"{row['speedup']:.3f}x | {s0:.2f} -> {s1:.2f} | {fmt(m0, '.1%')} -> "
            f"{fmt(m1, '.1%')} | {g0:.2f} -> {g1:.2f}{ratio} |"
        )
    return lines


def header_line(results: dict[str, Any]) -> str:
    """Which command(s) made the figures: one call, or the merged calls of one device."""
    parts = results.get("parts") or [{key: results.get(key) for key in PART_KEYS}]
    calls = [f"`{p['command']}`, {p['date']}, commit {p['commit']}, {p['runtime_seconds']:.0f} s "
             f"(budget {p['budget_seconds']:.0f} s)" for p in parts]  # fmt: skip
    text = "; then ".join(calls) + "."
    if results.get("partial"):
        text += " Cut short: the stages after the last one reported did not run."
    return text


def markdown_section(results: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    env = results["stages"]["env"].get("result", {})
    matmul = results["stages"].get("matmul", {}).get("result")
    m = results["machine"]
    device = env.get("device", "?")
    if "memory_gib" in env:
        device += f" ({env['memory_gib']} GiB, compute capability {env['capability']})"
    body = [
        START_MARK,
        "## GPU: the full stack vs a plain PyTorch loop, nanoGPT and the device's peak",
        "",
        header_line(results),
        "",
        f"- Device: {device}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}; host "
        f"{m['cpu']}, {m['usable_cores']} usable cores, Python {m['python']}.",
        f"- Measured peak: {matmul['n']}^3 {matmul['dtype']} matmul, "
        f"{matmul['tflops']:.0f} TFLOP/s (mean of 10 after 3 warm-ups)"
        if matmul
        else "- Measured peak: not measured",
        f"- Full stack: `kiln train ... objective=clm engine={results['engine']} "
        "cluster=local cluster.gpus_per_node=1 engine.precision=bf16 engine.compile=true "
        f"data.seq_len={SEQ} data.global_batch_size={BATCH} data.micro_batch_size={BATCH} "
        "logger.log_every=1`, with `data.document_masking=false data.reset_position_ids=false` "
        "(nanoGPT's work) except `gpt2_124m_docmask` and `moe` (kiln's default, document "
        "masking); `engine.compile_scope=auto` (DDP: the forward and the cross-entropy compiled "
        "as one function; FSDP2 and DeepSpeed: each block's forward and the cross-entropy "
        "apart) except `gpt2_124m_blocks` (blocks, with DDP too); shards built by `kiln data` (the Python stdlib) on local disk -> "
        "loader -> engine -> metrics.jsonl; step time = median `step_time` over steps "
        f"{results['warmup'] + 1}-{results['steps']}; wall = the time between the records of "
        "those steps per step (what the loop does between steps included: tokens/s and MFU "
        "come from it, as nanoGPT's bench.py times its steps); loader wait = median `data_wait`; peak "
        "memory = `torch.cuda.max_memory_allocated` as the trainer logs it; plan = `kiln plan` "
        f"with the same overrides ({results['engine']} total: weights, gradients, optimizer, "
        "buffers, activations). MoE: `model=tiny_moe` widened to "
        f"{' '.join(MOE_SHAPE)}.",
        "- Plain loop: `bench/gpu.py --plain-worker` on the trainer run's config: `build_model`, "
        "the forward (bf16 autocast) and the fp32 cross-entropy compiled as one function (as "
        "nanoGPT computes its loss in its compiled forward), fused AdamW, "
        "`clip_grad_norm_`, one real micro-batch of the trainer's loader (the same keys: with "
        "document masking, position and document ids too) kept on the GPU, a host sync per "
        "step; same steps; wall = the mean of its timed steps.",
        "- MFU = tokens/s x `kiln plan`'s FLOPs/token (6N + 12LHQT, no causal halving) / peak.",
        "",
    ]
    if predates_wall_clock(results):
        # the prose above is today's script's; say where this older run's work differed
        body[-1:-1] = [
            "- Recorded by an older `bench/gpu.py` (the commit above), whose work differed from "
            "the lines above: its plain loop compiled the model alone (the fp32 cross-entropy "
            "eager), its FSDP2 and DeepSpeed runs left the cross-entropy eager, and it recorded "
            "no wall time per step: the table's wall column and the tokens/s and MFU from it "
            "are the interval between a trainer run's records (a plain loop's median step); "
            "its checks below used the median step.",
        ]
    rows = table_rows(results)
    body.append("| " + " | ".join(rows[0]) + " |")
    body.append("|" + "|".join("---" for _ in rows[0]) + "|")
    body += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    body.append("")
    body += [f"- {line}" for line in check_lines(results)]
    body += [f"- {line}" for line in stage_lines(results)]
    if compared := before_after_lines(results, before):
        body += ["", *compared]
    if profiled := profile_lines(results):
        body += ["", *profiled]
    body += ["", END_MARK]
    return "\n".join(body) + "\n"


# --------------------------------------------------------------------------------------------
# main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `kiln data` output directory to use")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for everything")
    p.add_argument("--steps", type=int, default=0, help=f"steps per run (default {DEFAULT_STEPS})")
    p.add_argument(
        "--warmup", type=int, default=0, help=f"untimed steps (default {DEFAULT_WARMUP})"
    )
    p.add_argument(
        "--engine", default="ddp", help="engine of the trainer runs (ddp, fsdp, zero1, ...)"
    )
    p.add_argument("--skip", default="",
                   help="stages to skip (names as in --extra, or matmul, data), e.g. moe,plain_124m")  # fmt: skip
    p.add_argument("--extra", default="", help=f"extra stages to run: {','.join(EXTRA_RUNS)}")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"trainer runs to profile after their timed steps (default "
                        f"{DEFAULT_PROFILE}; '' for none)")  # fmt: skip
    p.add_argument("--traces", type=Path, help="copy the profiled runs' traces here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, a few steps")
    p.add_argument("--check", action="store_true",
                   help="no training: resolve every GPU stage's config with `kiln plan` (CPU)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--results", type=Path, help="results JSON (default bench/results/gpu.json)")
    p.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="file to update")
    p.add_argument("--render", type=Path, nargs="+",
                   help="rewrite the markdown section from results JSONs (several: one device's "
                        "calls, merged)")  # fmt: skip
    p.add_argument("--before", default=str(BEFORE_RESULTS),
                   help="a results JSON to compare run by run (default: the recorded H200 run "
                        "before the speed-ups; '' for none)")  # fmt: skip
    p.add_argument("--commit", help="the commit to report (default: asked of git here)")
    p.add_argument("--plain-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.plain_worker:
        return plain_worker(args.plain_worker, args.steps, args.out, args.smoke)
    if args.check:
        return check_stages(args)
    if args.render:
        try:
            results = merge_results([json.loads(path.read_text()) for path in args.render])
        except (OSError, ValueError, KeyError) as error:
            parser().error(f"--render: {error}")
        derive(results)
        before = load_before(args.before, results)
        write_markdown(args.markdown, markdown_section(results, before), SECTION)
        shown = ", ".join(str(path) for path in args.render)
        print(f"wrote the {SECTION} section of {args.markdown} from {shown}")
        return 0
    args.steps = args.steps or (SMOKE_STEPS if args.smoke else DEFAULT_STEPS)
    args.warmup = args.warmup or (SMOKE_WARMUP if args.smoke else DEFAULT_WARMUP)
    if args.steps <= args.warmup:
        parser().error("--steps must be above --warmup")
    budget = Budget(args.budget)
    skip = skipped_stages(args)
    extra = [s.strip() for s in args.extra.split(",") if s.strip()]
    if unknown := [name for name in extra if name not in EXTRA_RUNS]:
        parser().error(f"--extra: unknown stage(s) {unknown}; known: {list(EXTRA_RUNS)}")
    args.profile_runs = {s.strip() for s in args.profile.split(",") if s.strip()}
    if unknown := sorted(args.profile_runs - set(TRAINER_RUNS)):
        parser().error(f"--profile: unknown run(s) {unknown}; known: {list(TRAINER_RUNS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "bench/gpu.py" + (" --smoke" if args.smoke else "")
    command += f" --engine {args.engine}" if args.engine != "ddp" else ""
    command += f" --skip {args.skip}" if skip else ""
    command += f" --extra {args.extra}" if extra else ""
    command += f" --profile {args.profile}" if args.profile != DEFAULT_PROFILE else ""
    command += f" --steps {args.steps}" if args.steps != DEFAULT_STEPS and not args.smoke else ""
    results: dict[str, Any] = {
        "benchmark": SECTION,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": args.commit or git_commit(),
        "command": command,
        "smoke": args.smoke,
        "engine": args.engine,
        "steps": args.steps,
        "warmup": args.warmup,
        "budget_seconds": args.budget,
        "machine": machine(("torch",)),
        "targets": {
            "vs_nanogpt": TARGET_VS_NANOGPT,
            "vs_plain": TARGET_VS_PLAIN,
            "mfu_350m": TARGET_MFU_350M,
            "memory": TARGET_MEMORY,
            "nanogpt_tokens_per_s": NANOGPT_TOKENS_PER_S,
            "peak_tflops": PEAK_TFLOPS,
        },  # fmt: skip
        "stages": {},
        "runs": {},
    }
    failed = False
    results_path = args.results or (None if args.smoke else REPO / "bench" / "results" / "gpu.json")

    def snapshot() -> None:
        # after every stage: a run cut short (a device's time limit) keeps what it measured
        if results_path is not None:
            results.update(runtime_seconds=budget.seconds - budget.left(), failed=failed,
                           partial=True)  # fmt: skip
            write_json(results_path, results)

    def stage(name: str, fn: Any, *fn_args: Any, needs: float = 0.0) -> Any:
        result = run_stage(name, fn, *fn_args, needs=needs)
        snapshot()
        return result

    def run_stage(name: str, fn: Any, *fn_args: Any, needs: float = 0.0) -> Any:
        nonlocal failed
        if name in skip:
            results["stages"][name] = {"status": "skipped (--skip)", "seconds": 0.0}
            return None
        if not args.smoke and budget.left() < needs:
            results["stages"][name] = {
                "status": f"skipped (budget: {budget.left():.0f} s left, needs ~{needs:.0f} s)",
                "seconds": 0.0,
            }
            print(f"[gpu] {name}: skipped, {budget.left():.0f} s of the budget left", flush=True)
            return None
        print(f"[gpu] {name} ... ({budget.left():.0f} s of the budget left)", flush=True)
        start = time.perf_counter()
        try:
            result = fn(*fn_args)
        except Exception as error:  # noqa: BLE001 - every stage reports, the next ones still run
            failed = True
            seconds = time.perf_counter() - start
            message = str(error) if isinstance(error, StageError) else traceback.format_exc()
            results["stages"][name] = {"status": "failed", "seconds": seconds, "error": message}
            print(f"[gpu] {name}: FAILED after {seconds:.1f} s\n{message}", flush=True)
            return None
        seconds = time.perf_counter() - start
        results["stages"][name] = {"status": "ok", "seconds": seconds, "result": result}
        print(f"[gpu] {name}: {seconds:.1f} s", flush=True)
        return result

    try:
        env = stage("env", stage_env, args.smoke)
        if env is None:
            return finish(results, args, budget, True, results_path)
        stage("matmul", stage_matmul, args.smoke)
        data = stage("data", stage_data, args, work, budget)
        if data is not None:
            for name in [*ORDER, *extra]:
                if name in DDP_ONLY and args.engine != "ddp":
                    continue
                if name in PLAIN_RUNS:
                    trainer = results["runs"].get(PLAIN_RUNS[name])
                    if trainer is None:
                        continue
                    run = stage(name, stage_plain, name, trainer, args, work, budget,
                                needs=MIN_SECONDS[name])  # fmt: skip
                else:
                    run = stage(name, stage_trainer, name, args, data, work, budget,
                                needs=MIN_SECONDS[name])  # fmt: skip
                if run is not None:
                    results["runs"][name] = run
                    snapshot()
                    if args.traces and "profile" in run:
                        copy_traces(work / f"run-{name}" / "profile", args.traces / name)
                    wait = (
                        f", loader wait {run['data_wait_ms']:.2f} ms"
                        if "data_wait_ms" in run
                        else ""
                    )
                    print(f"[gpu]   {name}: {run['tokens_per_s']:,.0f} tokens/s, step "
                          f"{run['step_ms']:.2f} ms (wall {run['wall_ms']:.2f} ms){wait}, "
                          f"peak {run['peak_memory_gib']:.2f} GiB",
                          flush=True)  # fmt: skip
        return finish(results, args, budget, failed, results_path)
    finally:
        if args.keep or args.work:
            print(f"[gpu] kept {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def copy_traces(source: Path, target: Path) -> None:
    import shutil

    for trace in source.glob("*/*.trace.json.gz"):
        (target / trace.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(trace, target / trace.parent.name / trace.name)


def finish(results: dict[str, Any], args: argparse.Namespace, budget: Budget, failed: bool,
           path: Path | None) -> int:  # fmt: skip
    results["runtime_seconds"] = budget.seconds - budget.left()
    results["failed"] = failed
    results["partial"] = False
    derive(results)
    print()
    print_report(results)
    if path is not None:
        write_json(path, results)
        print(f"wrote {path}")
    if not args.smoke:
        before = load_before(args.before, results)
        write_markdown(args.markdown, markdown_section(results, before), SECTION)
        print(f"wrote the {SECTION} section of {args.markdown}")
    return 1 if failed else 0


def write_json(path: Path, results: dict[str, Any]) -> None:
    """`results` to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
