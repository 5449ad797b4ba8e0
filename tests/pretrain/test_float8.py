"""`engine.float8` (pretrain/engine/float8.py): which layers become FP8 matmuls, and what a
converted model computes. Training, resumption and export: test_engines.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module

from pretrain.config import build_config, register_configs
from pretrain.engine.float8 import apply_float8, float8_targets
from pretrain.models import build_model


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def config(name: str, objective: str, *extra: str):
    return build_config(compose("plan", overrides=[f"model={name}", f"objective={objective}",
                                                   "data=small", *extra]))  # fmt: skip


@pytest.mark.parametrize(("name", "objective", "converted"), [
    ("tiny_decoder", "clm", 14), ("tiny_gpt2", "clm", 12), ("tiny_moe", "clm", 8),
    ("tiny_encoder", "mlm", 12), ("tiny_encoder_decoder", "span", 32)])  # fmt: skip
def test_the_blocks_linear_layers_are_the_targets(name: str, objective: str,
                                                   converted: int) -> None:  # fmt: skip
    """Every family: the attention and dense feed-forward projections of every block, never
    the embeddings, the output head (tied, or `OutputHead`), BERT's MLM transform or an MoE
    router."""
    model = build_model(config(name, objective).model)
    targets, total = float8_targets(model)
    assert len(targets) == total == converted
    assert all(".blocks." in f".{t}" for t in targets)
    assert not any(t.endswith(("router", "head", "dense")) for t in targets)
    if name == "tiny_moe":  # experts are stacked parameters; only attention converts
        assert {t.rsplit(".", 1)[-1] for t in targets} == {"q", "k", "v", "o"}


def test_a_converted_decoder_is_close_to_bf16_and_keeps_its_names() -> None:
    cfg = config("tiny_decoder", "clm", "engine=ddp", "engine.float8=true")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    reference = build_model(cfg.model)
    reference.load_state_dict(model.state_dict())
    names = list(model.state_dict())
    assert apply_float8(model, cfg.engine, fsdp=False) == (14, 14)
    assert list(model.state_dict()) == names
    assert type(model.blocks[0].attn.q).__name__ == "Float8Linear"
    assert type(model.norm).__name__ != "Float8Linear"
    ids = torch.randint(5, cfg.model.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(ids, labels=ids), reference(ids, labels=ids)
    assert ours.item() != theirs.item()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-2)
    ours.backward()
    assert model.blocks[0].attn.q.weight.grad.dtype == torch.float32
