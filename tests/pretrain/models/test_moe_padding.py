"""MoE layers and padding: a `padding_mask` keeps padding positions out of routing, capacity,
the auxiliary losses and the statistics, so a batch's real tokens route as they would without
the pads; an all-true mask is the unmasked path exactly; every family passes its mask down."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pretrain.config import (
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    MoEConfig,
)
from pretrain.engine import compute_loss
from pretrain.models import build_model
from pretrain.models.loss import IGNORE_INDEX
from pretrain.models.moe import MoEFeedForward, RoutingStep, moe_layers, moe_metrics

SETTINGS = [
    {},  # dropless, grouped GEMM (on the CPU in fp32)
    {"grouped_gemm": False},  # dropless, the loop over experts
    {"capacity_factor": 1.0},
    {"capacity_factor": 0.75, "top_k": 1},
    {"capacity_factor": 1.25, "router": "sigmoid", "n_shared_experts": 1},
]


def layer(seed: int = 0, bias: bool = False, **moe: object) -> MoEFeedForward:
    settings = {"n_experts": 4, "top_k": 2} | moe
    cfg = DecoderConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, d_ff=48,
                        max_seq_len=64, bias=bias, moe=MoEConfig(**settings))  # fmt: skip
    torch.manual_seed(seed)
    module = MoEFeedForward(cfg)
    module.experts.reset_parameters(0.2, 0.2)
    return module.train()


def run(module: MoEFeedForward, x: Tensor, mask: Tensor | None) -> tuple[Tensor, RoutingStep,
                                                                        dict[str, Tensor]]:  # fmt: skip
    """Output, routing step and parameter gradients of one training forward + backward."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x, mask)
    step = module.last
    assert step is not None
    (out.square().sum() + step.loss).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out, step, grads | {"x": x.grad}


def assert_steps_equal(a: RoutingStep, b: RoutingStep) -> None:
    assert a.tokens == b.tokens
    for field in ("loss", "counts", "dropped", "entropy", "balance", "z"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0,
                                   msg=field)  # fmt: skip


@pytest.mark.parametrize("settings", SETTINGS)
def test_an_all_true_mask_is_the_unmasked_path(settings: dict) -> None:
    module = layer(**settings)
    x = torch.randn(3, 20, 32) + 0.5 * torch.randn(32)  # uneven routing
    out, step, grads = run(module, x, None)
    masked_out, masked_step, masked_grads = run(module, x, torch.ones(3, 20, dtype=torch.bool))
    assert torch.equal(out, masked_out)
    assert_steps_equal(step, masked_step)
    for name, grad in grads.items():
        assert torch.equal(grad, masked_grads[name]), name


@pytest.mark.parametrize("settings", SETTINGS)
def test_padding_is_not_routed_and_leaves_the_real_tokens_alone(settings: dict) -> None:
    """Pads appended to the rows (and some in front of one row), all the same state so that,
    routed, they would pile onto one expert: the real tokens' outputs, the losses, the
    statistics and the gradients equal those of the batch without pads, even where the
    capacity binds (it counts real tokens only); the pads' outputs are 0."""
    module = layer(bias="n_shared_experts" in settings, **settings)
    real = torch.randn(3, 20, 32) + 0.5 * torch.randn(32)
    pad_state = 3.0 * torch.randn(32)
    padded = pad_state.expand(3, 32, 32).clone()
    mask = torch.zeros(3, 32, dtype=torch.bool)
    for row, start in enumerate((0, 0, 9)):  # row 2: 9 pads in front, 3 behind
        padded[row, start : start + 20] = real[row]
        mask[row, start : start + 20] = True
    out, step, grads = run(module, real, None)
    padded_out, padded_step, padded_grads = run(module, padded, mask)
    torch.testing.assert_close(padded_out[mask], out.reshape(-1, 32), rtol=0, atol=0)
    assert not padded_out[~mask].any()
    assert_steps_equal(step, padded_step)
    if module.capacity_factor is not None and module.capacity_factor < 1.2:
        assert int(step.dropped) > 0  # the capacity binds
    for name, grad in grads.items():
        if name == "x":
            assert torch.equal(padded_grads["x"][mask], grad.reshape(-1, 32))
            assert not padded_grads["x"][~mask].any()
        else:
            torch.testing.assert_close(padded_grads[name], grad, rtol=0, atol=0, msg=name)
    # without the mask the pads take the capacity and skew the statistics (the old behaviour)
    _, unmasked_step, _ = run(module, padded, None)
    assert unmasked_step.tokens == 96 and int(unmasked_step.counts.sum()) == 96 * module.top_k


def test_a_forward_of_padding_only_adds_nothing() -> None:
    """A micro-batch with no real token (possible on one rank): output 0, a zero auxiliary
    loss that still backpropagates, and no weight in the metrics' means."""
    module = layer(capacity_factor=1.0)
    x = torch.randn(2, 8, 32, requires_grad=True)
    out = module(x, torch.zeros(2, 8, dtype=torch.bool))
    empty = module.last
    assert empty is not None and empty.tokens == 0 and int(empty.counts.sum()) == 0
    assert not out.any() and float(empty.loss.detach()) == 0.0
    (out.sum() + empty.loss).backward()
    _, step, _ = run(module, torch.randn(2, 8, 32), None)
    module.stats.add(step)
    alone = moe_metrics(module)
    module.stats.add(empty)
    module.stats.add(step)
    assert moe_metrics(module) == alone


def padded_batch(family: str, vocab: int, pads: int, seed: int = 0) -> dict[str, Tensor]:
    """Rows of 12 (encoder side) and 8 (decoder side) real tokens of different lengths, right
    padded by `pads` more positions (pad id 0, label -100)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 7, 10])

    def side(length: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(5, vocab, (3, length + pads), generator=generator)
        mask = torch.arange(length + pads) < lengths[:, None] * length // 12
        return ids.masked_fill(~mask, 0), mask

    ids, mask = side(12)
    labels = ids.masked_fill(~mask, IGNORE_INDEX)
    if family != "encoder_decoder":
        return {"input_ids": ids, "padding_mask": mask, "labels": labels}
    target, target_mask = side(8)
    return {"input_ids": ids, "padding_mask": mask, "decoder_input_ids": target,
            "decoder_padding_mask": target_mask,
            "labels": target.masked_fill(~target_mask, IGNORE_INDEX)}  # fmt: skip


def crop(batch: dict[str, Tensor], pads: int) -> dict[str, Tensor]:
    """The batch with `pads` fewer trailing positions (all of them padding)."""
    return {key: value[:, : value.shape[1] - pads] for key, value in batch.items()}


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
def test_every_family_keeps_padding_out_of_its_moe_layers(family: str) -> None:
    """A training step on a right-padded batch and on the same batch with 20 more pads per
    row: the same loss (language model plus auxiliary), MoE statistics and gradients. Each MoE
    layer sees the family's padding mask and gives the pads 0."""
    moe = MoEConfig(n_experts=4, top_k=1, every_k_layers=2, capacity_factor=1.0)
    common = {"vocab_size": 97, "d_model": 32, "n_heads": 4, "d_ff": 48, "max_seq_len": 64,
              "moe": moe}  # fmt: skip
    if family == "decoder":
        cfg = DecoderConfig(n_layers=2, **common)
    elif family == "encoder":
        cfg = EncoderConfig(n_layers=2, **common)
    else:
        cfg = EncoderDecoderConfig(n_encoder_layers=2, n_decoder_layers=2, **common)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    layers = moe_layers(model)
    seen: list[tuple[Tensor, Tensor | None, Tensor]] = []
    for module in layers:
        module.register_forward_hook(
            lambda m, args, out: seen.append((args[0], args[1] if len(args) > 1 else None, out))
        )
    results = []
    batch = padded_batch(family, cfg.vocab_size, pads=24)
    for pads in (24, 4):
        seen.clear()
        model.zero_grad(set_to_none=True)
        loss = compute_loss(model, crop(batch, 24 - pads))
        loss.backward()
        metrics = moe_metrics(model)
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        for x, mask, out in seen:
            assert mask is not None and mask.shape == x.shape[:2]
            assert not out[~mask].any()
        results.append((loss.detach(), metrics, grads))
    (loss, metrics, grads), (cropped_loss, cropped_metrics, cropped_grads) = results
    assert metrics["moe_dropped"] > 0  # the capacity binds
    torch.testing.assert_close(loss, cropped_loss, rtol=1e-6, atol=1e-6)
    assert metrics.keys() == cropped_metrics.keys()
    for key, value in metrics.items():
        assert value == pytest.approx(cropped_metrics[key], rel=1e-5, abs=1e-6), key
    for name, grad in grads.items():
        torch.testing.assert_close(grad, cropped_grads[name], rtol=1e-4, atol=1e-6, msg=name)
