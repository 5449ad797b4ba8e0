"""Mixture-of-experts feed-forward: dispatch and capacity dropping against a per-token
reference, the load-balancing loss at work, statistics, accounting, and every family."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import (
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    MoEConfig,
    build_config,
    register_configs,
)
from pretrain.engine import compute_loss
from pretrain.models import build_model
from pretrain.models.accounting import count_parameters, training_flops
from pretrain.models.moe import (
    MoEFeedForward,
    collect_moe_losses,
    moe_layers,
    moe_metrics,
    take_step_loss,
)


def decoder(**moe: object) -> DecoderConfig:
    settings = {"n_experts": 4, "top_k": 2} | moe
    return DecoderConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                         max_seq_len=64, moe=MoEConfig(**settings))  # fmt: skip


def layer(cfg: DecoderConfig, seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    module = MoEFeedForward(cfg)
    module.experts.reset_parameters(0.2, 0.2)
    for bias in (module.experts.gate_bias, module.experts.up_bias, module.experts.down_bias):
        if bias is not None:
            torch.nn.init.normal_(bias, std=0.1)
    return module


def reference(module: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: each (choice, token) assignment in priority order (all first choices,
    then all second ones), dropped when its expert is full; the expert's MLP written out."""
    ex = module.experts
    _, weights, experts = module.route(x)
    capacity = module.capacity(x.shape[0])
    filled = [0] * module.n_experts
    out = torch.zeros_like(x)
    dropped = 0
    for choice in range(module.top_k):
        for token in range(x.shape[0]):
            e = int(experts[token, choice])
            if capacity is not None and filled[e] >= capacity:
                dropped += 1
                continue
            filled[e] += 1
            h = x[token] @ ex.up[e] + (ex.up_bias[e] if ex.up_bias is not None else 0)
            if ex.gate is not None:
                g = x[token] @ ex.gate[e] + (ex.gate_bias[e] if ex.gate_bias is not None else 0)
                h = ex.act(g) * h
            else:
                h = ex.act(h)
            y = h @ ex.down[e] + (ex.down_bias[e] if ex.down_bias is not None else 0)
            out[token] += weights[token, choice] * y
    for shared in module.shared:
        out = out + shared(x)
    return out, dropped


@pytest.mark.parametrize(
    "settings",
    [
        {},  # dropless, softmax top-2
        {"capacity_factor": 1.0},
        {"capacity_factor": 0.5, "top_k": 1},
        {"capacity_factor": 1.25, "router": "sigmoid", "n_shared_experts": 1},
        {"top_k": 3, "normalize_top_k": False},
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_dispatch_and_dropping_equal_the_per_token_reference(
    settings: dict[str, object], bias: bool
) -> None:
    cfg = decoder(**settings)
    cfg.bias = bias
    cfg.activation = "gelu" if bias else "swiglu"
    module = layer(cfg).train()
    x = torch.randn(3, 20, cfg.d_model) + 0.5 * torch.randn(cfg.d_model)  # uneven routing
    out = module(x)
    expected, dropped = reference(module, x.reshape(-1, cfg.d_model))
    torch.testing.assert_close(out.reshape(-1, cfg.d_model), expected, atol=2e-6, rtol=1e-5)
    step = module.last
    assert step is not None
    assert int(step.dropped) == dropped
    if module.capacity_factor is not None and module.capacity_factor < 1.5:
        assert dropped > 0  # the capacity binds in these cases
    assert int(step.counts.sum()) == 60 * module.top_k
    out.sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_loop_over_experts(dtype: torch.dtype) -> None:
    """Dropless experts through torch._grouped_mm (no host sync) give the loop's outputs and
    gradients, with an expert that gets no token."""
    results = []
    for grouped in (True, False):
        cfg = decoder(grouped_gemm=grouped, n_experts=5)
        cfg.activation = "swiglu"
        module = layer(cfg).to(dtype).train()
        with torch.no_grad():  # expert 4 is never chosen
            module.router.weight[4] = -100.0 * module.router.weight[4].abs().sum()
        torch.manual_seed(1)
        x = (torch.randn(2, 24, cfg.d_model) + 0.5).to(dtype).requires_grad_()
        with torch.profiler.profile() as profile:
            out = module(x)
        ops = {event.key for event in profile.key_averages()}
        assert ("aten::_grouped_mm" in ops) == grouped
        assert int(module.last.counts[4]) == 0
        out.backward(torch.randn_like(out))
        results.append((out, x.grad, {n: p.grad for n, p in module.named_parameters()}))
    (out, grad, grads), (loop_out, loop_grad, loop_grads) = results
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    )
    torch.testing.assert_close(out, loop_out, **tolerance)
    torch.testing.assert_close(grad, loop_grad, **tolerance)
    for name, value in grads.items():
        torch.testing.assert_close(value, loop_grads[name], **tolerance, msg=name)


@pytest.mark.parametrize(
    ("dtype", "d_model", "d_ff", "grouped"),
    [
        (torch.float32, 36, 44, True),  # 144 and 176 bytes: rows 16 bytes apart
        (torch.float32, 36, 42, False),  # 168 bytes: the hidden rows are not
        (torch.float32, 34, 48, False),  # 136 bytes: the tokens' rows are not
        (torch.bfloat16, 40, 56, True),  # 80 and 112 bytes
        (torch.bfloat16, 40, 60, False),  # 120 bytes
    ],
)
def test_grouped_gemm_falls_back_to_the_loop_for_unaligned_widths(
    dtype: torch.dtype, d_model: int, d_ff: int, grouped: bool
) -> None:
    """`torch._grouped_mm` wants every operand's rows 16 bytes apart (it raises "strides
    should be multiple of 16 bytes"): other widths take the loop over experts, and train."""
    cfg = DecoderConfig(vocab_size=97, d_model=d_model, n_layers=1, n_heads=2, d_ff=d_ff,
                        max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=2))  # fmt: skip
    module = layer(cfg).to(dtype).train()
    x = torch.randn(2, 24, d_model, dtype=dtype, requires_grad=True)
    with torch.profiler.profile() as profile:
        out = module(x)
    assert ("aten::_grouped_mm" in {e.key for e in profile.key_averages()}) == grouped
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.requires_grad)


def test_capacity_is_the_configured_share() -> None:
    module = layer(decoder(capacity_factor=1.25, top_k=2, n_experts=8))
    assert module.capacity(1000) == math.ceil(1.25 * 1000 * 2 / 8)  # 313
    assert layer(decoder()).capacity(1000) is None  # dropless


def test_losses_and_statistics() -> None:
    torch.manual_seed(0)
    cfg = decoder(aux_loss_coef=0.5, z_loss_coef=0.25)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = compute_loss(model, {"input_ids": ids, "labels": ids})
    plain = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    assert collect_moe_losses(model) is not None  # the second forward left its step too
    metrics = moe_metrics(model)
    balance, z = metrics["moe_balance_loss"], metrics["moe_z_loss"]
    # two forwards were collected: compute_loss's and the plain one (same weights, same input)
    assert float((loss - plain).detach()) == pytest.approx(2 * (0.5 * balance + 0.25 * z), rel=1e-4)
    assert take_step_loss(model) == pytest.approx(2 * 2 * (0.5 * balance + 0.25 * z), rel=1e-4)
    for index in range(cfg.n_layers):
        assert metrics[f"moe/L{index}/load_max"] >= 1.0 >= metrics[f"moe/L{index}/load_min"]
        assert metrics[f"moe/L{index}/dropped"] == 0.0
        assert 0 < metrics[f"moe/L{index}/entropy"] <= math.log(4) + 1e-6
    assert moe_metrics(model) == {}  # reset: nothing since the last call
    model.eval()
    with torch.no_grad():
        model(ids)
    assert collect_moe_losses(model) is None  # evaluation adds no auxiliary loss


def test_load_balancing_loss_evens_out_a_skewed_router() -> None:
    """A toy regression through one top-1 layer whose router starts out sending most tokens
    to one expert: with the Switch loss the busiest expert's share falls near 1 (balanced);
    without it the skew stays."""

    def train(aux: float) -> float:
        cfg = decoder(n_experts=4, top_k=1, aux_loss_coef=aux, z_loss_coef=0.0)
        module = layer(cfg, seed=1).train()
        with torch.no_grad():
            module.router.weight[0] += (
                0.5  # expert 0 wins nearly all for inputs along (1, 1, ..., 1)
            )
        torch.manual_seed(2)
        target = torch.nn.Linear(cfg.d_model, cfg.d_model)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        for _ in range(150):
            x = torch.randn(256, cfg.d_model) * 0.5 + 0.3
            loss = torch.nn.functional.mse_loss(module(x), target(x).detach())
            step = module.last
            assert step is not None
            (loss + step.loss).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            x = torch.randn(4096, cfg.d_model) * 0.5 + 0.3
            _, _, experts = module.route(x)
        counts = torch.bincount(experts.flatten(), minlength=4).float()
        return float(counts.max() / counts.mean())

    skewed, balanced = train(0.0), train(0.5)
    assert balanced < 1.3 and skewed > 3.0  # measured: 1.20 and 3.99 (of at most 4)


@pytest.fixture(scope="module")
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


@pytest.mark.parametrize("name", ["tiny_moe", "mixtral_8x7b"])
def test_moe_preset_parameters_match_accounting(name: str, hydra_context: None) -> None:
    cfg = build_config(compose("plan", overrides=[f"model={name}", "data=small"])).model
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_parameters(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts.total
    per_expert = sum(p[0].numel() for p in moe_layers(model)[0].experts.parameters())
    unused = (cfg.moe.n_experts - cfg.moe.top_k) * per_expert * len(moe_layers(model))
    assert counts.active == counts.total - unused
    if name == "mixtral_8x7b":  # Mistral's figures: 46.7B total, 12.9B active
        assert counts.total == pytest.approx(46.7e9, rel=0.01)
        assert counts.active == pytest.approx(12.9e9, rel=0.01)


def test_moe_flops_match_the_counter() -> None:
    """Dropless routing runs every assignment: the counted matmuls equal training_flops'
    active-parameter figure (router, top_k experts, attention)."""
    torch.manual_seed(0)
    cfg = decoder(n_shared_experts=1)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = compute_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
    expected = training_flops(cfg, 32).per_sequence * 2
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_every_family_takes_moe_blocks(family: str) -> None:
    moe = MoEConfig(n_experts=4, top_k=2, every_k_layers=2, capacity_factor=1.5)
    common = {"vocab_size": 97, "d_model": 32, "n_heads": 4, "d_ff": 48, "max_seq_len": 64}
    if family == "encoder":
        cfg = EncoderConfig(n_layers=4, moe=moe, **common)
        batch = {"input_ids": torch.randint(5, 97, (2, 16))}
        batch["labels"] = batch["input_ids"]
    else:
        cfg = EncoderDecoderConfig(n_encoder_layers=2, n_decoder_layers=2, moe=moe, **common)
        batch = {"input_ids": torch.randint(5, 97, (2, 16)),
                 "decoder_input_ids": torch.randint(5, 97, (2, 8)),
                 "labels": torch.randint(5, 97, (2, 8))}  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    assert len(moe_layers(model)) == 2  # every 2nd block (of each stack)
    loss = compute_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_a_fresh_switch_t5_routes_near_uniformly(hydra_context: None) -> None:
    """tiny_moe_t5's routers start at Switch Transformer's scale, N(0, (0.1 / d_model)**0.5),
    not T5's d_model**-0.5: routing probabilities near uniform (entropy 1.34-1.36 nats of
    ln 4 = 1.39 measured; 1.02-1.12 at T5's scale) and the z-loss near its floor (ln 4)**2.
    Which expert wins (and so what the capacity drops) does not depend on the router's scale."""
    cfg = build_config(
        compose("plan", overrides=["model=tiny_moe_t5", "objective=span", "data=small"])
    ).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    layers = moe_layers(model)
    assert len(layers) == 2  # one per stack
    for module in layers:
        std = float(module.router.weight.detach().std())
        assert std == pytest.approx((0.1 / cfg.d_model) ** 0.5, rel=0.1)
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(5, cfg.vocab_size, (16, 128), generator=generator),
             "decoder_input_ids": torch.randint(5, cfg.vocab_size, (16, 32), generator=generator)}  # fmt: skip
    batch["labels"] = batch["decoder_input_ids"]
    compute_loss(model, batch)
    metrics = moe_metrics(model)
    uniform = math.log(cfg.moe.n_experts)
    for index in range(2):
        assert metrics[f"moe/L{index}/entropy"] > 0.95 * uniform
    assert metrics["moe_z_loss"] < 1.1 * uniform**2
