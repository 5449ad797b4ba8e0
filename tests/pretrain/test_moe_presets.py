"""The MoE presets of every family: `kiln plan`'s parameters and FLOPs equal the accounting
(pretrain.models.accounting) and the instantiated module (meta device, FlopCounterMode); the
realistic shapes give their published sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import KilnConfig, build_config, register_configs
from pretrain.engine import compute_loss
from pretrain.models import build_model
from pretrain.models.accounting import count_parameters, head_fraction, training_flops
from pretrain.models.moe import moe_layers
from pretrain.objectives import encoder_decoder_lengths

KILN = Path(sys.executable).parent / "kiln"
PRESETS = {
    "tiny_moe": "clm",
    "tiny_moe_encoder": "mlm",
    "tiny_moe_t5": "span",
    "mixtral_8x7b": "clm",
    "olmoe_1b_7b": "clm",
}


def overrides(name: str) -> list[str]:
    return [f"model={name}", f"objective={PRESETS[name]}", "data=small"]


@pytest.fixture(scope="module")
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def config(name: str) -> KilnConfig:
    return build_config(compose("plan", overrides=overrides(name)))


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    cwd = tmp_path_factory.mktemp("plans")
    result = {}
    for name in PRESETS:
        run = subprocess.run([str(KILN), "plan", *overrides(name), "plan.format=json"],
                             capture_output=True, text=True, cwd=cwd, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        result[name] = json.loads(run.stdout)
    return result


def flops(cfg: KilnConfig) -> float:
    if cfg.model.family == "encoder_decoder":
        return training_flops(cfg.model, *encoder_decoder_lengths(cfg)).per_token
    share = head_fraction(cfg.objective)  # masked LM: the head runs at the masked positions
    return training_flops(cfg.model, cfg.data.seq_len, head_share=share).per_token


@pytest.mark.parametrize("name", PRESETS)
def test_kiln_plan_matches_accounting_and_module(
    name: str, plans: dict[str, dict], hydra_context: None
) -> None:
    plan, cfg = plans[name], config(name)
    counts = count_parameters(cfg.model)
    assert plan["model"]["moe"] is True and plan["model"]["family"] == cfg.model.family
    assert plan["model"]["params_total"] == counts.total
    assert plan["model"]["params_active"] == counts.active
    assert plan["flops"]["per_token"] == pytest.approx(flops(cfg), rel=1e-12)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == counts.total
    layers = moe_layers(model)
    assert layers
    per_expert = sum(p[0].numel() for p in layers[0].experts.parameters())
    idle = (cfg.model.moe.n_experts - cfg.model.moe.top_k) * per_expert * len(layers)
    assert counts.active == counts.total - idle  # active: router + top_k experts per token


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("mixtral_8x7b", 46.7e9, 12.9e9), ("olmoe_1b_7b", 6.9e9, 1.3e9)],
)
def test_realistic_presets_have_their_published_sizes(
    name: str, total: float, active: float, plans: dict[str, dict]
) -> None:
    model = plans[name]["model"]
    assert model["params_total"] == pytest.approx(total, rel=0.005)
    assert model["params_active"] == pytest.approx(active, rel=0.02)  # OLMoE: 1.28B


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_moe_encoder", "tiny_moe_t5"])
def test_tiny_moe_preset_flops_match_the_counter(name: str, hydra_context: None) -> None:
    """Dropless routing runs exactly the routed work, which is what the plan counts (with a
    capacity factor the padded buffer computes capacity_factor x the routed expert FLOPs, so
    tiny_moe_t5 runs dropless here)."""
    cfg = config(name)
    cfg.model.moe.capacity_factor = None
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    rows, vocab = 2, cfg.model.vocab_size
    if cfg.model.family == "encoder_decoder":
        enc, dec = encoder_decoder_lengths(cfg)
        batch = {"input_ids": torch.randint(5, vocab, (rows, enc)),
                 "decoder_input_ids": torch.randint(5, vocab, (rows, dec)),
                 "labels": torch.randint(5, vocab, (rows, dec))}  # fmt: skip
        expected = training_flops(cfg.model, enc, dec).per_sequence * rows
    else:
        ids = torch.randint(5, vocab, (rows, cfg.data.seq_len))
        batch = {"input_ids": ids, "labels": ids}
        expected = training_flops(cfg.model, cfg.data.seq_len).per_sequence * rows
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        compute_loss(model, batch).backward()
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)
