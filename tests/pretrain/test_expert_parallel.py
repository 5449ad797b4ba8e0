"""Expert parallelism (`model.moe.expert_parallel`, DDP engine) on 2 CPU ranks (torchrun, gloo):
outputs, losses, gradients, clipped norms and AdamW steps equal the replicated model's on the
same global batch (also a right-padded one, whose pads are not dispatched); checkpoints
restore every expert; `kiln train` with it learns, resumes bitwise (also under activation
checkpointing) and follows the replicated run's losses; the engines that cannot take it
refuse it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from test_engines import kiln_train, losses
from test_loader import write_corpus

from pretrain.checkpoint_io import load_consolidated
from pretrain.config import ConfigError, KilnConfig, build_config, register_configs
from pretrain.models.moe import moe_layers

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def train_config() -> Iterator[Callable[..., KilnConfig]]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield lambda *overrides: build_config(compose("train", overrides=list(overrides)))


@pytest.mark.slow
def test_expert_parallel_equals_data_parallel(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        cases = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(cases) == {"dropless_top2", "capacity_shared_bias", "top1_sigmoid",
                              "padded_capacity"}  # fmt: skip
        for name, case in cases.items():
            assert case["local_experts"] == [2, 2], name  # 4 experts over 2 ranks, each layer
            assert case["state_at_start"] == 0.0  # the shards are the replicated init
            for key in ("loss", "logits", "grads", "weights_after_steps"):
                assert case[key] < TOLERANCE, (name, key, case[key])
            assert case["norm_rel"] < TOLERANCE, name  # the global norm, experts of both ranks
            assert all(norm > 0.05 for norm in case["norms"])  # so clipping was exercised
            # checkpoint: another init differs, the load restores every expert and the Adam
            # state, and the next step is the same as the original engine's
            assert case["state_before_load"] > 0.1
            assert case["state_after_load"] == case["state_after_resumed_step"] == 0.0
            assert case["files"] == ["engine.pt", "expert_parallel.json", "optimizer_rank1.pt"]
        assert cases["capacity_shared_bias"]["dropped"] > 0  # the capacity binds
        assert cases["padded_capacity"]["dropped"] > 0  # counted on the real tokens
        assert cases["dropless_top2"]["dropped"] == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine=zero2"], "engine=ddp only, not engine.kind='deepspeed'"),
        (["engine=fsdp"], "engine=ddp only, not engine.kind='fsdp'"),
        (["engine=ddp", "engine.compile=true"], "engine.compile"),
        (["engine=ddp", "model.moe.n_experts=3", "model.moe.top_k=1"],
         "model.moe.n_experts=3 must be a multiple of the 2 data-parallel ranks"),
        (["engine=ddp", "model=tiny_decoder"], "needs model.moe.n_experts > 0"),
    ],
)  # fmt: skip
def test_engines_without_expert_parallelism_refuse_it(
    train_config: Callable[..., KilnConfig], overrides: list[str], message: str
) -> None:
    base = ["model=tiny_moe", "cluster=local_cpu", "data.global_batch_size=8",
            "data.micro_batch_size=2", "model.moe.expert_parallel=true"]  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        train_config(*base, *overrides)
    train_config(*base, "engine=ddp")  # accepted


@pytest.mark.slow
def test_kiln_train_with_expert_parallel_learns_and_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "shards"
    write_corpus(corpus, {"web": [200, 150, 180]}, {"web": 1.0})

    def args(run_dir: Path, *extra: str) -> list[str]:
        return [
            "model=tiny_moe", "objective=clm", "engine=ddp", "cluster=local_cpu", "data=small",
            f"data.path={corpus}", "data.seq_len=32", "data.global_batch_size=8",
            "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
            "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.eval_every=0",
            "optim.lr=1e-2", "optim.warmup_steps=2", "logger=none", "logger.log_every=1",
            "model.moe.capacity_factor=1.25", *extra,
        ]  # fmt: skip

    full = tmp_path / "full"
    result = kiln_train(args(full, "model.moe.expert_parallel=true"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = losses(full)
    assert sorted(theirs) == list(range(1, 9)) and all(map(math.isfinite, theirs.values()))
    assert sum(theirs[s] for s in (6, 7, 8)) / 3 < theirs[1] - 0.1  # it learns
    step4 = full / "checkpoints" / "step_00000004"
    saved = torch.load(step4 / "engine.pt", weights_only=True)["model"]
    assert saved["blocks.0.mlp.experts.up"].shape[0] == 4  # every expert, gathered to rank 0
    assert json.loads((step4 / "expert_parallel.json").read_text())["world_size"] == 2
    _, model = load_consolidated(full / "final")  # for kiln export: the whole model
    assert [tuple(m.experts.up.shape) for m in moe_layers(model)] == [(4, 64, 128)] * 2
    resumed = tmp_path / "resumed"
    # resumed with activation checkpointing, which recomputes the exchanges in the backward
    resume = [f"trainer.resume={step4}", "engine.activation_checkpointing=true"]
    result = kiln_train(args(resumed, "model.moe.expert_parallel=true", *resume), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = losses(resumed)
    assert sorted(ours) == [5, 6, 7, 8]
    assert all(ours[s] == theirs[s] for s in ours), (ours, theirs)  # bitwise
    _, model = load_consolidated(resumed / "final")  # gathered through the wrapper's names
    assert [tuple(m.experts.up.shape) for m in moe_layers(model)] == [(4, 64, 128)] * 2
    replicated = tmp_path / "replicated"  # the same run without expert parallelism
    result = kiln_train(args(replicated), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = losses(replicated)
    assert max(abs(plain[s] - theirs[s]) for s in plain) < 1e-4, (plain, theirs)
