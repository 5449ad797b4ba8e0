"""An MoE decoder trains with every engine on 2 CPU ranks (torchrun, gloo): the auxiliary
losses reach the loss, and per-layer load, dropped-token fraction and router entropy reach
metrics.jsonl (reduced over ranks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_engines import kiln_train
from test_loader import write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_corpus(out, {"web": [200, 150, 180]}, {"web": 1.0})
    return out


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp"])
def test_moe_decoder_trains_with_each_engine(engine: str, corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "model=tiny_moe", "objective=clm", f"engine={engine}", "cluster=local_cpu",
        "data=small", f"data.path={corpus}", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", "data.shuffle_buffer=64", f"trainer.run_dir={run_dir}",
        "trainer.max_steps=10", "trainer.checkpoint_every=100", "trainer.eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none", "logger.log_every=1",
        "model.moe.capacity_factor=1.0", "model.moe.aux_loss_coef=0.02",
    ]  # fmt: skip
    result = kiln_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r.get("kind") == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    losses = [r["loss"] for r in train]
    assert all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1  # it learns
    layers = 2  # tiny_moe: MoE on both blocks
    for record in train:
        for index in range(layers):
            assert record[f"moe/L{index}/load_max"] >= 1.0 >= record[f"moe/L{index}/load_min"]
            assert 0.0 <= record[f"moe/L{index}/dropped"] < 0.5
            assert 0.0 < record[f"moe/L{index}/entropy"] <= math.log(4) + 1e-6
        # the added loss is what the layers report: per layer aux * balance + z * z-loss
        expected = layers * (0.02 * record["moe_balance_loss"] + 0.001 * record["moe_z_loss"])
        assert record["moe_aux_loss"] == pytest.approx(expected, rel=1e-6)
    assert any(r["moe/L0/dropped"] > 0 for r in train)  # capacity factor 1.0 binds sometimes
