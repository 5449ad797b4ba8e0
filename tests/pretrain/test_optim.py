"""AdamW weight-decay groups for every family (bare and wrapped), and the lr schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import DecoderConfig, EncoderConfig, EncoderDecoderConfig, OptimConfig
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.optim import (
    build_optimizer,
    build_scheduler,
    lr_lambda,
    param_groups,
    use_fused,
)

SMALL = {"vocab_size": 64, "d_model": 16, "n_heads": 2, "d_ff": 32, "max_seq_len": 32}
MODELS = {
    "decoder_tied": DecoderConfig(n_layers=2, **SMALL),
    "decoder_untied_learned_bias": DecoderConfig(
        n_layers=2, tie_embeddings=False, position="learned", bias=True, norm="layernorm", **SMALL
    ),
    "encoder_bert": EncoderConfig(
        n_layers=2,
        position="learned",
        type_vocab_size=2,
        bias=True,
        norm="layernorm",
        activation="gelu",
        pooler=True,
        **SMALL,
    ),
    "encoder_decoder_t5": EncoderDecoderConfig(
        n_encoder_layers=2, n_decoder_layers=2, position="relative", **SMALL
    ),
    "encoder_decoder_untied": EncoderDecoderConfig(
        n_encoder_layers=1, n_decoder_layers=1, tie_embeddings=False, activation="geglu", **SMALL
    ),
}


def expected_split(model: nn.Module) -> tuple[set[int], set[int]]:
    """(decayed, not decayed) parameter ids, spelled out from module types independently of
    the implementation: nn.Linear weights are decayed; everything else is not."""
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    everything = {id(p) for p in model.parameters()}
    decayed = linear_weights - embeddings
    return decayed, everything - decayed


def group_ids(groups: list[dict]) -> dict[str, list[int]]:
    return {g["name"]: [id(p) for p in g["params"]] for g in groups}


@pytest.mark.parametrize("name", MODELS)
def test_linear_weights_decay_norms_biases_and_embeddings_do_not(name: str) -> None:
    model = build_model(MODELS[name])
    groups = param_groups(model, 0.1)
    ids = group_ids(groups)
    decayed, exempt = expected_split(model)
    assert set(ids["decay"]) == decayed and set(ids["no_decay"]) == exempt
    # Each parameter exactly once, every parameter covered.
    listed = ids["decay"] + ids["no_decay"]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # The spelled-out expectation, by kind of parameter.
    names = {id(p): n for n, p in model.named_parameters()}
    for pid in ids["no_decay"]:
        n = names[pid]
        assert "norm" in n or n.endswith("bias") or "embed" in n, n
    assert all(names[pid].endswith(".weight") for pid in ids["decay"])
    assert id(model.embed.weight) in ids["no_decay"]


def test_exact_group_sizes_of_the_tied_decoder() -> None:
    cfg = MODELS["decoder_tied"]
    groups = param_groups(build_model(cfg), 0.1)
    d, f, v, n_layers = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    per_block_linear = 4 * d * d + 3 * d * f  # q k v o, gate up down (swiglu, no bias)
    per_block_norms = 2 * d
    decay, no_decay = groups
    assert sum(p.numel() for p in decay["params"]) == n_layers * per_block_linear
    assert sum(p.numel() for p in no_decay["params"]) == v * d + n_layers * per_block_norms + d


def test_a_head_tied_by_assignment_counts_once_as_an_embedding() -> None:
    model = build_model(MODELS["decoder_untied_learned_bias"])
    model.head.weight = model.embed.weight  # tie after construction, as some recipes do
    ids = group_ids(param_groups(model, 0.1))
    assert id(model.embed.weight) in ids["no_decay"]
    assert id(model.embed.weight) not in ids["decay"]
    listed = ids["decay"] + ids["no_decay"]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))


def test_decay_all_puts_everything_in_one_group_and_frozen_are_left_out() -> None:
    model = build_model(MODELS["encoder_bert"])
    [group] = param_groups(model, 0.05, decay_all=True)
    assert group["name"] == "decay" and group["weight_decay"] == 0.05
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    model.embed.weight.requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert all(p is not model.embed.weight for g in groups for p in g["params"])


def test_wrapped_models_group_like_the_bare_model() -> None:
    """checkpoint_wrapper and torch.compile add parent modules and prefixes to names; the
    type walk goes through them (compiling is lazy: nothing is traced here)."""
    model = build_model(MODELS["encoder_decoder_t5"])
    bare = group_ids(param_groups(model, 0.1))
    wrapped = torch.compile(apply_activation_checkpointing(model))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    assert group_ids(param_groups(wrapped, 0.1)) == bare


def test_fsdp2_sharded_model_groups_like_the_bare_model(tmp_path: Path) -> None:
    """fully_shard swaps parameters for DTensors and classes for subclasses: compare by name."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = MODELS["decoder_untied_learned_bias"]
    bare = build_model(cfg)
    expected = {
        g["name"]: sorted(n for n, p in bare.named_parameters() if any(p is q for q in g["params"]))
        for g in param_groups(bare, 0.1)
    }
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = build_model(cfg)
        mesh = init_device_mesh("cpu", (1,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, 0.1)
        assert type(next(iter(groups[0]["params"]))).__name__ == "DTensor"
        got = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
        assert got == expected
    finally:
        dist.destroy_process_group()


def test_build_optimizer_hyperparameters_and_fused_choice() -> None:
    model = build_model(MODELS["decoder_tied"])
    cfg = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.2, fused=False)
    optimizer = build_optimizer(model, cfg, device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.2, 0.0]
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["lr"] == 1e-3 and not optimizer.defaults["fused"]
    assert use_fused(OptimConfig(fused=None), "cuda") is True
    assert use_fused(OptimConfig(fused=None), "cpu") is False
    assert use_fused(OptimConfig(fused=True), "cpu") is True
    # The fused kernel also runs on the CPU (torch >= 2.4): one real step.
    fused = build_optimizer(model, OptimConfig(fused=True), device_type="cpu")
    assert fused.defaults["fused"] is True
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    fused.step()


# --------------------------------------------------------------------------------------------
# schedules


def multipliers(schedule: str, steps: list[int], **overrides: float) -> list[float]:
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, **overrides)
    fn = lr_lambda(cfg, max_steps=110)
    return [fn(step) for step in steps]


def test_warmup_is_linear_from_a_small_rate_to_lr_for_every_schedule() -> None:
    for schedule in ("cosine", "wsd", "constant"):
        assert multipliers(schedule, [0, 4, 9, 10]) == pytest.approx([0.1, 0.5, 1.0, 1.0])
    no_warmup = lr_lambda(OptimConfig(warmup_steps=0, schedule="cosine"), 100)
    assert no_warmup(0) == 1.0


def test_cosine_values_at_key_steps() -> None:
    # warmup 10, max 110: the middle of the decay is step 60, the end step 110.
    got = multipliers("cosine", [10, 35, 60, 85, 110, 500])
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    three_quarters = 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4))
    assert got == pytest.approx([1.0, quarter, 0.55, three_quarters, 0.1, 0.1])
    values = multipliers("cosine", list(range(10, 111)))
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_constant_then_linear_over_the_last_fraction() -> None:
    # decay_fraction 0.2 of 110 steps = 22 steps: decay from step 88 to 110.
    got = multipliers("wsd", [10, 60, 87, 88, 99, 110, 200], decay_fraction=0.2)
    assert got == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1])
    # A decay longer than what follows warmup starts when warmup ends.
    late = lr_lambda(OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=1.0), 20)
    assert [late(9), late(10), late(15), late(20)] == pytest.approx([1.0, 1.0, 0.55, 0.1])


def test_constant_stays_at_lr_after_warmup() -> None:
    assert multipliers("constant", [10, 60, 110, 1000]) == [1.0, 1.0, 1.0, 1.0]


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="optim.schedule='linear'"):
        lr_lambda(OptimConfig(schedule="linear"), 10)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_a_resumed_scheduler_equals_an_uninterrupted_one(schedule: str) -> None:
    cfg = OptimConfig(lr=0.01, schedule=schedule, warmup_steps=5, fused=False)
    max_steps, stop = 30, 12
    batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
        optimizer = build_optimizer(model, cfg, device_type="cpu")
        return model, optimizer, build_scheduler(optimizer, cfg, max_steps)

    def train(model, optimizer, scheduler, steps: int) -> list[float]:
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            model(batch).pow(2).mean().backward()
            optimizer.step()
            scheduler.step()
        return rates

    model, optimizer, scheduler = fresh()
    straight = train(model, optimizer, scheduler, max_steps)
    assert straight == pytest.approx([0.01 * lr_lambda(cfg, max_steps)(s) for s in range(30)])

    first, optimizer_a, scheduler_a = fresh()
    rates = train(first, optimizer_a, scheduler_a, stop)
    saved = {
        "model": first.state_dict(),
        "optimizer": optimizer_a.state_dict(),
        "scheduler": scheduler_a.state_dict(),
    }
    assert saved["scheduler"]["last_epoch"] == stop
    assert saved["scheduler"]["lr_lambdas"] == [None, None]  # the schedule is not saved state
    resumed, optimizer_b, scheduler_b = fresh()
    resumed.load_state_dict(saved["model"])
    optimizer_b.load_state_dict(saved["optimizer"])
    scheduler_b.load_state_dict(saved["scheduler"])
    rates += train(resumed, optimizer_b, scheduler_b, max_steps - stop)
    assert rates == straight
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
