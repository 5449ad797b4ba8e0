"""The DeepSpeed and FSDP engines. The config dict DeepSpeed gets (fast), then end to end (slow):
real 2-rank `kiln train` runs on CPU (torchrun, gloo). A SIGKILLed run resumes bitwise (ZeRO-2,
ZeRO-3, FSDP), FSDP and DeepSpeed ZeRO-2/3 checkpoints resume at another world size (2 -> 1 and
1 -> 2 ranks; DeepSpeed through a universal checkpoint, with the Adam state), and injected NaNs
are skipped and counted without touching the weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from test_loader import write_corpus

from pretrain.config import ConfigError, KilnConfig, build_config, register_configs
from pretrain.engine.deepspeed_engine import deepspeed_config

KILN = Path(sys.executable).parent / "kiln"
GLOBAL_BATCH = 8
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def train_config() -> Iterator[Callable[..., KilnConfig]]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield lambda *overrides: build_config(compose("train", overrides=list(overrides)))


def test_deepspeed_config_from_the_typed_config(train_config) -> None:
    cfg = train_config("engine=zero2", "data.global_batch_size=64", "data.micro_batch_size=4",
                       "optim.grad_clip=0.5")  # fmt: skip
    config = deepspeed_config(cfg, accumulation=8, world=2, device_type="cpu")
    assert config["train_batch_size"] == 64 and config["gradient_accumulation_steps"] == 8
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["contiguous_gradients"] and zero["overlap_comm"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 200_000_000
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert config["bf16"] == {"enabled": False}  # CPU trains in fp32
    assert config["zero_allow_untested_optimizer"] and not config["wall_clock_breakdown"]
    assert "zero_force_ds_cpu_optimizer" not in config
    cuda = deepspeed_config(cfg, accumulation=8, world=2, device_type="cuda", parameters=1000)
    assert cuda["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cuda["zero_optimization"]["reduce_bucket_size"] == 1000  # capped at the model
    fp32 = train_config("engine=zero2", "engine.precision=fp32")
    assert not deepspeed_config(fp32, 1, 8, device_type="cuda")["bf16"]["enabled"]


def test_deepspeed_config_offload_and_stage_specifics(train_config) -> None:
    cfg = train_config("engine=zero3_offload")
    config = deepspeed_config(cfg, accumulation=1, world=8, device_type="cuda")
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert "allgather_bucket_size" not in zero  # stages 1-2 only
    assert config["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW stays
    stage0 = train_config("engine=zero1", "engine.zero_stage=0", "optim.grad_clip=1.0")
    assert deepspeed_config(stage0, 1, 2, device_type="cpu")["gradient_clipping"] == 0.0
    assert deepspeed_config(stage0, 1, 2, device_type="cuda")["gradient_clipping"] == 1.0
    cfg.engine.zero_stage = 2  # built by hand, past the config checks
    with pytest.raises(ValueError, match="offload_params needs engine.zero_stage=3"):
        deepspeed_config(cfg, accumulation=1, world=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [200, 150, 180]}, {"web": 1.0})
    return out


def train_args(corpus: Path, run_dir: Path, engine: str, *extra: str) -> list[str]:
    return [
        "model=tiny_decoder", "objective=clm", f"engine={engine}", "cluster=local_cpu",
        "data=small", f"data.path={corpus}", "data.seq_len=32",
        f"data.global_batch_size={GLOBAL_BATCH}", "data.micro_batch_size=2",
        "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}", "trainer.max_steps=12",
        "trainer.checkpoint_every=4", "trainer.eval_every=0", "optim.lr=3e-3",
        "optim.warmup_steps=2", "logger=none", "logger.log_every=1", *extra,
    ]  # fmt: skip


def kiln_train(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KILN), "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r.get("kind") == kind}


def losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(run_dir, "train").items()}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The (fp32 master) model weights in a checkpoint of the deepspeed or fsdp engine."""
    if (path / "deepspeed").is_dir():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    single = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path / "fsdp", single)
    return torch.load(single, weights_only=False)["model"]


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """`reference(engine)`: an uninterrupted 12-step run of that engine (run once per module)."""
    runs: dict[str, Path] = {}

    def run(engine: str) -> Path:
        if engine not in runs:
            run_dir = tmp_path_factory.mktemp(f"reference_{engine}") / "run"
            result = kiln_train(train_args(corpus, run_dir, engine), run_dir.parent)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[engine] = run_dir
        return runs[engine]

    return run


@slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_sigkill_and_resume_gives_bitwise_identical_losses(
    engine: str, corpus: Path, tmp_path: Path, reference
) -> None:
    theirs = losses(reference(engine))
    assert sorted(theirs) == list(range(1, 13)) and all(map(math.isfinite, theirs.values()))
    run_dir = tmp_path / "killed"
    process = subprocess.Popen([str(KILN), "train", *train_args(corpus, run_dir, engine)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert latest.read_text() in ("step_00000004", "step_00000008")
    result = kiln_train(train_args(corpus, run_dir, engine), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all_gather_into_tensor" not in result.stderr  # ZeRO-3's FutureWarning, 16 a step
    ours = losses(run_dir)
    assert ours.keys() == theirs.keys()
    assert ours == theirs  # bitwise: the same floats, step by step


@slow
def test_every_engine_logs_the_learning_rate_its_step_used(reference) -> None:
    """The logged `lr` of step s is the schedule's value the step's update used (warmup over 2
    steps: step 1 trains at lr / 2). DeepSpeed's optimizer steps inside the last micro-batch's
    `ds.step()`, and its runs logged the next step's value (3e-3 at step 1)."""
    from pretrain.config import OptimConfig
    from pretrain.optim import lr_lambda

    schedule = lr_lambda(OptimConfig(lr=3e-3, warmup_steps=2), 12)
    expected = {step: 3e-3 * schedule(step - 1) for step in range(1, 13)}
    assert expected[1] == pytest.approx(1.5e-3)
    for engine in ("zero2", "fsdp"):
        logged = {step: r["lr"] for step, r in records(reference(engine), "train").items()}
        assert logged == pytest.approx(expected, rel=1e-6), engine


@slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp"])
def test_an_intermediate_checkpoint_of_each_engine_exports(
    engine: str, tmp_path: Path, reference
) -> None:
    """`kiln export` of RUN_DIR/checkpoints/step_8, for evaluation: read in one process with no
    process group, the weights are bitwise the ones the engine saved (ZeRO's fp32 masters,
    FSDP's shards, DDP's state); the step-12 one equals the run's final/; transformers loads
    the export and computes our model's logits."""
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint_io import load_consolidated, open_checkpoint

    run_dir = reference(engine)
    kind = {"ddp": "ddp", "fsdp": "fsdp"}.get(engine, "deepspeed")
    source = open_checkpoint(checkpoint(run_dir, 8))
    assert (source.kind, source.step, source.config.name) == (kind, 8, "tiny_decoder")
    model = source.load_model()
    if engine == "ddp":
        saved = torch.load(checkpoint(run_dir, 8) / "engine.pt", weights_only=True)["model"]
    else:
        saved = model_weights(checkpoint(run_dir, 8))
    ours = model.state_dict()
    assert ours.keys() == saved.keys()
    assert all(torch.equal(ours[name], saved[name]) for name in saved)
    assert not torch.equal(ours["embed.weight"], open_checkpoint(checkpoint(run_dir, 4)).load_model().state_dict()["embed.weight"])  # fmt: skip
    _, final = load_consolidated(run_dir / "final")
    last = open_checkpoint(checkpoint(run_dir, 12)).load_model().state_dict()
    assert all(torch.equal(last[name], value) for name, value in final.state_dict().items())
    assert open_checkpoint(run_dir).path == run_dir / "final"  # a run directory: its final/
    if kind == "deepspeed":  # a partition cut short is named (DeepSpeed's error names none)
        from pretrain.checkpoint_io import CheckpointError
        from pretrain.engine.deepspeed_engine import TAG

        damaged = shutil.copytree(checkpoint(run_dir, 8), tmp_path / "damaged" / "step_00000008")
        shard = sorted((damaged / TAG).glob("*optim_states.pt"))[-1]
        written = shard.stat().st_size
        shard.write_bytes(shard.read_bytes()[:5000])
        with pytest.raises(CheckpointError, match=rf"{shard.name} has 5,000 bytes, {written:,} "
                           "were written: the checkpoint changed after it was written"):  # fmt: skip
            open_checkpoint(damaged).load_model()
        unchecked = open_checkpoint(damaged)
        unchecked.verify = False  # trainer.verify_checkpoints=false: DeepSpeed's own load finds it
        with pytest.raises(CheckpointError, match=rf"{shard.name} cut short or damaged"):
            unchecked.load_model()

    out = tmp_path / "hf"
    result = subprocess.run(
        [str(KILN), "export", f"export.checkpoint={checkpoint(run_dir, 8)}",
         f"export.output_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    said = f"kiln export: reading the {kind} checkpoint {checkpoint(run_dir, 8)} at step 8\n"
    assert said in result.stdout
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a ddp or fsdp engine checkpoint holds (model, optimizer, RNG), by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(f"{prefix}/{i}", value)

    if (path / "fsdp").is_dir():
        single = path.parent / f"{path.name}.all.pt"
        dcp_to_torch_save(path / "fsdp", single)
        walk("fsdp", torch.load(single, weights_only=False))
    for file in sorted(path.glob("*.pt")):
        walk(file.name, torch.load(file, weights_only=False))
    return found


@slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_background_checkpoints_equal_the_foreground_ones(
    engine: str, corpus: Path, tmp_path: Path, reference
) -> None:
    """`trainer.async_checkpoint`: the loop goes on while a thread writes each checkpoint
    (the last in the foreground), and what lands on disk is the state at its step: every
    tensor equal to the foreground run's checkpoint, model, optimizer and RNG alike."""
    run_dir = tmp_path / "async"
    result = kiln_train(train_args(corpus, run_dir, engine, "trainer.async_checkpoint=true"),
                        tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = reference(engine)
    assert losses(run_dir) == losses(theirs)  # bitwise
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    saves = [r for r in map(json.loads, lines) if r.get("event") == "checkpoint"]
    assert [(r["step"], r["background"]) for r in saves] == [(4, True), (8, True), (12, False)]
    # a background save is logged again once on disk, at the step the loop found it there
    written = [r for r in map(json.loads, lines) if r.get("event") == "checkpoint_written"]
    assert [Path(r["path"]).name for r in written] == ["step_00000004", "step_00000008"]
    assert [r["step"] >= step for r, step in zip(written, (4, 8), strict=True)] == [True, True]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000012"
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    for step in (4, 8, 12):
        ours, expected = (
            checkpoint_tensors(checkpoint(run_dir, step)),
            checkpoint_tensors(checkpoint(theirs, step)),
        )
        assert ours.keys() == expected.keys() and len(ours) > 10
        for name, tensor in expected.items():
            assert torch.equal(ours[name], tensor), (step, name)
        state = json.loads((checkpoint(run_dir, step) / "trainer.json").read_text())
        assert state["step"] == step and state["loader"]["samples"] == step * GLOBAL_BATCH


@slow
def test_fsdp_resumes_at_another_world_size(corpus: Path, tmp_path: Path, reference) -> None:
    source = reference("fsdp")
    run_dir = tmp_path / "one_rank"
    args = train_args(corpus, run_dir, "fsdp", "cluster.gpus_per_node=1",
                      f"trainer.resume={checkpoint(source, 8)}")  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    start = next(r for r in records(run_dir, "event").values() if r["event"] == "start")
    assert start["world_size"] == 1 and start["resumed_from"].endswith("step_00000008")
    ours, theirs = losses(run_dir), losses(source)
    assert sorted(ours) == [9, 10, 11, 12]
    for step in ours:  # the same samples and weights: only the reduction order differs
        assert math.isfinite(ours[step]) and abs(ours[step] - theirs[step]) < 1e-4
    state = json.loads((checkpoint(run_dir, 12) / "trainer.json").read_text())
    assert state["world_size"] == 1
    assert state["loader"]["samples"] == 12 * GLOBAL_BATCH  # the cursor went on, no repeats


def adam_steps(path: Path) -> set[int]:
    """The Adam step counts in a DeepSpeed ZeRO checkpoint (every param group, every rank)."""
    steps = set()
    for file in (path / "deepspeed").glob("*optim_states.pt"):
        optimizer = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        # ZeRO 1-2 keep the torch optimizer's state under one key, ZeRO-3 under the other
        inner = optimizer.get("base_optimizer_state") or optimizer["optimizer_state_dict"]
        steps |= {int(state["step"]) for state in inner["state"].values()}
    return steps


def adam_state(path: Path, scratch: Path) -> dict[tuple[str, str], torch.Tensor]:
    """(parameter, fp32 | exp_avg | exp_avg_sq) -> the whole tensor, whatever the ranks that
    wrote the DeepSpeed checkpoint `path` (consolidated by the universal conversion)."""
    from pretrain.engine.deepspeed_engine import convert_to_universal

    convert_to_universal(path / "deepspeed", scratch / "deepspeed", log=scratch / "log")
    state = {}
    for parameter in (scratch / "deepspeed" / "zero").iterdir():
        for key in ("fp32", "exp_avg", "exp_avg_sq") if parameter.is_dir() else ():
            value = torch.load(parameter / f"{key}.pt", weights_only=False)
            tensor = value["param"] if isinstance(value, dict) else value
            state[parameter.name, key] = tensor.detach()
    return state


@slow
@pytest.mark.parametrize(
    ("engine", "source_ranks", "ranks"),
    [("zero2", 2, 1), ("zero3", 2, 1), ("zero2", 1, 2), ("zero3", 1, 2)],
    ids=["zero2-2to1", "zero3-2to1", "zero2-1to2", "zero3-1to2"],
)
def test_deepspeed_resumes_at_another_world_size(
    engine: str, source_ranks: int, ranks: int, corpus: Path, tmp_path: Path, reference
) -> None:
    if source_ranks == 2:
        source = reference(engine)  # an uninterrupted 12-step run on 2 ranks
    else:
        source = tmp_path / "source"
        args = train_args(corpus, source, engine, "cluster.gpus_per_node=1")
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "resumed"
    args = train_args(corpus, run_dir, engine, f"cluster.gpus_per_node={ranks}",
                      f"trainer.resume={checkpoint(source, 8)}")  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MPU is not provided" not in result.stdout + result.stderr  # DeepSpeed's TP note
    start = next(r for r in records(run_dir, "event").values() if r["event"] == "start")
    assert start["world_size"] == ranks and start["resumed_from"].endswith("step_00000008")
    converted = checkpoint(source, 8) / "deepspeed_universal"  # kept for the next resume
    assert (converted / "deepspeed" / "zero").is_dir()
    assert (converted / "latest_universal").is_file()
    assert (converted / "checksums.json").is_file()  # its reuse checks it first
    assert not list(checkpoint(source, 8).glob(".*.tmp"))
    ours, theirs = losses(run_dir), losses(source)
    assert sorted(ours) == [9, 10, 11, 12]
    if (engine, source_ranks) == ("zero2", 2):
        # a converted copy changed since (a disk, a hand): converted again, not read as it is
        weights = next(converted.rglob("fp32.pt"))
        tensor = torch.load(weights, weights_only=False)
        torch.save(torch.full_like(tensor, 5.0) if isinstance(tensor, torch.Tensor)
                   else {**tensor, "param": torch.full_like(tensor["param"], 5.0)}, weights)  # fmt: skip
        again = tmp_path / "again"
        args = train_args(corpus, again, engine, f"cluster.gpus_per_node={ranks}",
                          f"trainer.resume={checkpoint(source, 8)}")  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (
            f"kiln train: {converted}: {weights.relative_to(converted)} does not match the "
            "checksum written with it since the conversion; converting the checkpoint again\n"
        ) in result.stderr
        assert losses(again) == ours  # bitwise: the same conversion, the same steps
    # Measured: the same up to 3e-8 relative (only the reduction order differs between 1 and
    # 2 ranks); a resume without the Adam state is off by 1.5e-3 to 3.7e-3 at steps 10-12.
    for step in ours:
        assert math.isfinite(ours[step]) and abs(ours[step] - theirs[step]) < 1e-5 * theirs[step]
    state = json.loads((checkpoint(run_dir, 12) / "trainer.json").read_text())
    assert state["world_size"] == ranks
    assert state["loader"]["samples"] == 12 * GLOBAL_BATCH  # the cursor went on, no repeats
    # The optimizer state came along: every group's Adam step went on from 8 (a fresh state
    # would be at 4, and a shared step tensor ahead), and the moments at step 12 are the
    # uninterrupted run's (measured: 2e-7..2e-6 relative; a fresh state is off by ~1).
    assert adam_steps(checkpoint(run_dir, 12)) == adam_steps(checkpoint(source, 12)) == {12}
    mine = adam_state(checkpoint(run_dir, 12), tmp_path / "mine")
    uninterrupted = adam_state(checkpoint(source, 12), tmp_path / "uninterrupted")
    assert mine.keys() == uninterrupted.keys()
    assert {name for name, _ in mine} >= {"embed.weight", "blocks.1.attn.q.weight"}
    for key, value in uninterrupted.items():
        assert value.abs().sum() > 0, key
        assert (mine[key] - value).norm() <= 1e-4 * value.norm(), key


@slow
@pytest.mark.parametrize(
    ("engine", "fault"),
    [
        # every micro-batch of steps 3 and 4, on both ranks
        ("fsdp", {}),
        # only rank 1's last micro-batch: the finite first micro-batch has already been reduced
        # into ZeRO's partitions by then, and must be discarded with the rest of the step
        ("zero2", {"KILN_FAULT_NAN_MICRO": "1", "KILN_FAULT_NAN_RANK": "1"}),
        # only rank 0's first micro-batch: no backward for either micro-batch of the step,
        # while ZeRO-3 gathers and releases partitioned parameters around the forwards
        ("zero3", {"KILN_FAULT_NAN_MICRO": "0", "KILN_FAULT_NAN_RANK": "0"}),
    ],
    ids=["fsdp-all", "zero2-rank1-last-micro", "zero3-rank0-first-micro"],
)
def test_injected_nan_is_skipped_counted_and_leaves_the_weights(
    engine: str, fault: dict[str, str], corpus: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "nan"
    env = dict(os.environ, KILN_FAULT_NAN_STEPS="3,4", **fault)
    args = train_args(corpus, run_dir, engine, "trainer.max_steps=6",
                      "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10")  # fmt: skip
    result = kiln_train(args, tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    # DeepSpeed's CPU shared-memory op (inference only) is neither built nor loaded
    assert "shm_comm" not in result.stdout + result.stderr
    train = records(run_dir, "train")
    assert [train[s]["skipped"] for s in range(1, 7)] == [False, False, True, True, False, False]
    assert train[6]["nonfinite_steps"] == 2
    assert all(math.isfinite(train[s]["loss"]) for s in (5, 6))  # finite again
    assert all(math.isfinite(train[s]["grad_norm"]) for s in (5, 6))
    # a skipped step's norm is NaN on every engine (DeepSpeed's own figure is inf)
    assert all(math.isnan(train[s]["grad_norm"]) for s in (3, 4))
    assert train[5]["lr"] < train[4]["lr"] < train[3]["lr"]  # the schedule went on regardless
    before, after, next_step = (model_weights(checkpoint(run_dir, s)) for s in (2, 4, 5))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped: not touched
    assert not all(torch.equal(after[k], next_step[k]) for k in after)  # step 5 trained


def test_compile_scope(train_config) -> None:
    from pretrain.config import ConfigError
    from pretrain.engine import compile_scope

    assert compile_scope(train_config("engine=ddp").engine) == "loss"
    assert compile_scope(train_config("engine=fsdp").engine) == "blocks"
    assert compile_scope(train_config("engine=zero3").engine) == "blocks"
    cp = train_config("engine=ddp", "engine.context_parallel=2", "cluster.gpus_per_node=2",
                      "cluster=local_cpu")  # fmt: skip
    assert compile_scope(cp.engine) == "blocks"
    assert compile_scope(train_config("engine=ddp", "engine.compile_scope=blocks").engine) == (
        "blocks"
    )
    with pytest.raises(ConfigError, match="engine.compile_scope=loss .*engine.kind='fsdp'"):
        train_config("engine=fsdp", "engine.compile_scope=loss")
    with pytest.raises(ConfigError, match="engine.compile_scope"):
        train_config("engine=ddp", "engine.compile_scope=everything")
    with pytest.raises(ConfigError, match="engine.compile_mode"):
        train_config("engine=ddp", "engine.compile_mode=fastest")
    assert train_config("engine=fsdp", "engine.compile_mode=max-autotune").engine.compile_mode == (
        "max-autotune"
    )
    with pytest.raises(ConfigError, match="trainer.checkpoint_every=-1 must be >= 0"):
        train_config("trainer.checkpoint_every=-1")


def corpus_with_val(out: Path) -> Path:
    """The `corpus` fixture's kind of shards plus a held-out split, for eval records."""
    import numpy as np
    from test_loader import VOCAB

    from data_pipeline.shards import Manifest, TokenizerRecord, write_manifest, write_shard

    rng = np.random.default_rng(1)
    records = []
    for split, n_docs in (("train", 300), ("val", 60)):
        docs = [rng.integers(5, VOCAB, rng.integers(3, 60)) for _ in range(n_docs)]
        blocks = [docs[i : i + 7] for i in range(0, n_docs, 7)]
        records.append(write_shard(out, "web", split, 0, blocks, VOCAB))
    tokenizer = TokenizerRecord("tokenizer.model", "ab" * 32, VOCAB, "bpe",
                                {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}, [])  # fmt: skip
    write_manifest(out, Manifest("e" * 64, tokenizer, records, {"web": 1.0}))
    return out


@slow
def test_sharded_engines_start_from_rank_0s_weights_without_a_whole_model(tmp_path: Path) -> None:
    """FSDP2 and ZeRO-3 ranks build an empty model (meta device; `zero.Init` partitions) and
    rank 0 alone the weights: after the engine takes over, they are bitwise those a whole
    build from the same seed gives (decoder, T5 under activation checkpointing, an ALiBi
    encoder, an MoE under ZeRO-3), buffers included (RoPE's, ALiBi's), and the random state
    goes on as after a whole build. DDP still builds whole on every rank."""
    worker = Path(__file__).with_name("sharded_build_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(worker), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        cases = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(cases) == 7
        for name, case in cases.items():
            sharded = not name.startswith("ddp")
            assert case["weights_held"] == (sharded and rank == 0), name
            assert case["numel"] == 1.0, name  # every parameter there, whole or partitioned
            # nothing of the model in memory before the engine: all meta, or all partitioned
            assert case["held"] == (0.0 if sharded else 1.0), name
            assert case["meta"] == (1.0 if name.startswith("fsdp") else 0.0), name
            assert case["random_state_equal"], name
            assert case["buffers_equal"], name
            if rank == 0:
                assert case["keys_equal"] and case["max_difference"] == 0.0, name
        assert {name: case["buffers"] for name, case in cases.items()} == {
            "fsdp_decoder": 1, "fsdp_t5_checkpointed": 0, "fsdp_encoder_alibi": 1,
            "zero3_decoder": 1, "zero3_t5": 0, "zero3_moe_checkpointed": 1, "ddp_decoder": 1,
        }  # fmt: skip


@slow
def test_compiled_loss_on_two_ranks_matches_eager(tmp_path: Path) -> None:
    """`engine=ddp engine.compile=true`: the forward and the cross-entropy compiled as one
    function (DDP's compiled graph split at its buckets) trains to eager's losses and eval
    losses. `trainer.checkpoint_every=0` leaves only the last step's checkpoint."""
    corpus = corpus_with_val(tmp_path / "shards")
    runs = {}
    for compiled in ("false", "true"):
        run_dir = tmp_path / f"compile_{compiled}"
        args = train_args(corpus, run_dir, "ddp", "cluster.gpus_per_node=2",
                          f"engine.compile={compiled}", "trainer.max_steps=6",
                          "trainer.checkpoint_every=0", "trainer.eval_every=3",
                          "trainer.eval_steps=2")  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[compiled] = run_dir
    eager, compiled = (losses(runs[c]) for c in ("false", "true"))
    assert sorted(eager) == sorted(compiled) == list(range(1, 7))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5)
    assert eager[6] < eager[1]
    evals = [{s: r["eval_loss"] for s, r in records(runs[c], "eval").items()} for c in runs]
    assert sorted(evals[0]) == [3, 6]
    for step in evals[0]:
        assert evals[1][step] == pytest.approx(evals[0][step], rel=1e-5)
    for run_dir in runs.values():
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        assert saved == ["step_00000006"]


@pytest.fixture(scope="module")
def eager_four_steps(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The losses of a 4-step eager FSDP2 run with the tied head: what the compiled and the
    chunked runs below must reproduce."""
    run_dir = tmp_path_factory.mktemp("eager_four_steps") / "run"
    args = train_args(corpus, run_dir, "fsdp", "engine.compile=false", "trainer.max_steps=4",
                      "trainer.checkpoint_every=0")  # fmt: skip
    result = kiln_train(args, run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(run_dir)


@slow
def test_compiled_blocks_and_cross_entropy_under_fsdp2_and_zero(
    corpus: Path, tmp_path: Path, eager_four_steps: dict[int, float]
) -> None:
    """`engine.compile=true` with FSDP2 and ZeRO-2 (compile_scope=blocks): each block's
    forward and the cross-entropy are compiled, one graph each (no recompilation, the
    engines' hooks outside them), the losses are eager's, and the final checkpoint keeps the
    model's own parameter names (`kiln export` loads it). ZeRO-3, which hooks every
    submodule, compiles the cross-entropy only and says so."""
    import gzip

    from pretrain.checkpoint_io import load_consolidated

    def run(engine: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
        run_dir = tmp_path / engine
        args = train_args(corpus, run_dir, engine, "engine.compile=true", "trainer.max_steps=4",
                          "trainer.checkpoint_every=0", "trainer.profile.start_step=4",
                          "trainer.profile.steps=1")  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return run_dir, result

    reference = eager_four_steps
    # per step on each rank: 2 micro-batches x (2 blocks + the cross-entropy)
    for engine, regions in (("fsdp", 6), ("zero2", 6), ("zero3", 2)):
        run_dir, result = run(engine)
        trace = run_dir / "profile" / "step4-4" / "rank0.trace.json.gz"
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
        compiled = [e["name"] for e in events if e.get("name", "").startswith("Torch-Compiled")]
        assert len(compiled) == regions, (engine, compiled)
        assert all(name.endswith("/0") for name in compiled), compiled  # never traced again
        said = "engine.compile with ZeRO-3 compiles the cross-entropy only" in result.stderr
        assert said is (engine == "zero3")
        for step, loss in losses(run_dir).items():
            assert loss == pytest.approx(reference[step], rel=1e-4), (engine, step)
        _, model = load_consolidated(run_dir / "final")
        assert not any("_orig_mod" in name for name in model.state_dict())


@slow
def test_chunked_loss_trains_like_the_whole_logits_under_each_engine(
    corpus: Path, tmp_path: Path, eager_four_steps: dict[int, float]
) -> None:
    """`engine.loss_chunk_tokens=16` (the head and cross-entropy 16 of the 64 tokens of a
    micro-batch at a time) on 2 ranks: FSDP2 and DDP compiled whole (compile_scope=loss)
    with the tied head, ZeRO-3 with an untied one (whose weight DeepSpeed gathers around the
    head module's forward) and `engine.compile` (each chunk's softmax and gradient compiled),
    each with the losses of the logits held whole."""

    def run(name: str, engine: str, *extra: str) -> dict[int, float]:
        run_dir = tmp_path / name
        args = train_args(corpus, run_dir, engine, "trainer.max_steps=4",
                          "trainer.checkpoint_every=0", *extra)  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return losses(run_dir)

    untied = "model.tie_embeddings=false"
    references = {"tied": eager_four_steps, "untied": run("whole_untied", "fsdp", untied)}
    chunked = {
        ("fsdp", "tied"): run("fsdp", "fsdp", "engine.loss_chunk_tokens=16"),
        ("ddp_compiled", "tied"): run(
            "ddp", "ddp", "engine.loss_chunk_tokens=16", "engine.compile=true"
        ),
        ("zero3", "untied"): run(
            "zero3", "zero3", "engine.loss_chunk_tokens=16", untied, "engine.compile=true"
        ),
    }
    for (name, head), got in chunked.items():
        reference = references[head]
        assert sorted(got) == sorted(reference) == [1, 2, 3, 4]
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], rel=1e-4), (name, step)
    assert references["tied"][4] < references["tied"][1]


def test_float8_config(train_config) -> None:
    """`engine.float8` runs under DDP and FSDP2; DeepSpeed and unknown recipes are config
    errors that say why."""
    assert not train_config("engine=fsdp").engine.float8
    cfg = train_config("engine=fsdp", "engine.float8=true", "engine.float8_recipe=rowwise")
    assert cfg.engine.float8 and cfg.engine.float8_recipe == "rowwise"
    with pytest.raises(ConfigError, match="torchao does not support DeepSpeed.*'deepspeed'"):
        train_config("engine=zero2", "engine.float8=true")
    with pytest.raises(ConfigError, match="engine.float8_recipe"):
        train_config("engine=ddp", "engine.float8=true", "engine.float8_recipe=blockwise")


@slow
def test_float8_trains_resumes_exactly_and_exports(corpus: Path, tmp_path: Path) -> None:
    """`engine.float8=true` on 2 CPU ranks (torch's CPU `_scaled_mm`): FSDP2 all-gathering
    the weights in FP8 trains to within 0.1% of bf16's losses and exactly as DDP does, compiled
    or not; a run resumed from its step-2 checkpoint repeats steps 3-4 bitwise; the export
    holds the model's own parameter names."""
    import shutil

    from safetensors.torch import load_file

    def run(name: str, engine: str, *extra: str) -> tuple[Path, dict[int, float], str]:
        run_dir = tmp_path / name
        args = train_args(corpus, run_dir, engine, "trainer.max_steps=4",
                          "trainer.checkpoint_every=2", "engine.precision=bf16", *extra)  # fmt: skip
        result = kiln_train(args, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return run_dir, losses(run_dir), result.stderr

    _, bf16, _ = run("bf16", "fsdp")
    fsdp_dir, fsdp, said = run("fsdp", "fsdp", "engine.float8=true")
    assert ("engine.float8 (tensorwise, all-gathered in FP8): 14 of the blocks' 14 linear "
            "layers run as FP8 matmuls") in said  # fmt: skip
    _, ddp, said = run("ddp", "ddp", "engine.float8=true", "engine.compile=true")
    assert "engine.float8 (tensorwise): 14 of the blocks' 14" in said
    assert sorted(fsdp) == sorted(ddp) == sorted(bf16) == [1, 2, 3, 4]
    for step in bf16:
        assert fsdp[step] != bf16[step]  # FP8 matmuls: not the bf16 figures ...
        assert fsdp[step] == pytest.approx(bf16[step], rel=1e-3)  # ... but close to them
        assert ddp[step] == pytest.approx(fsdp[step], rel=1e-4)
    assert fsdp[4] < fsdp[1]

    # resume from step 2: the copy's later checkpoint and export removed, `latest` moved back
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_dir, resumed)
    shutil.rmtree(checkpoint(resumed, 4))
    shutil.rmtree(resumed / "final")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    args = train_args(corpus, resumed, "fsdp", "trainer.max_steps=4",
                      "trainer.checkpoint_every=2", "engine.precision=bf16", "engine.float8=true")  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    again = [r for r in map(json.loads, lines) if r.get("kind") == "train"][4:]
    assert [(r["step"], r["loss"]) for r in again] == [(3, fsdp[3]), (4, fsdp[4])]

    weights = load_file(fsdp_dir / "final" / "model.safetensors")
    reference = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(weights[k].dtype == reference[k].dtype for k in weights)
    assert all(torch.isfinite(w).all() for w in weights.values())


@slow
def test_eval_without_a_held_out_split_is_reported_once(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "no_val"
    args = train_args(corpus, run_dir, "ddp", "trainer.max_steps=3", "trainer.eval_every=1")
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("kiln train: no evaluation:") == 1
    assert "has no usable val shards" in result.stderr
    events = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "no_eval"]  # fmt: skip
    assert [e["step"] for e in events] == [1] and "trainer.eval_every=0" in events[0]["reason"]
    assert not records(run_dir, "eval") and sorted(losses(run_dir)) == [1, 2, 3]
