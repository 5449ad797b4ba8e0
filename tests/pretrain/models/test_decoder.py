"""The LLaMA/GPT-2 decoder: parameter and FLOP accounting, masks, caching, generation,
activation checkpointing and torch.compile-friendliness."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import DecoderConfig, build_config, register_configs
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.models.accounting import count_parameters, training_flops
from pretrain.models.decoder import Decoder, DecoderCache
from pretrain.models.generation import SamplingConfig, generate

PRESETS = ("tiny_decoder", "tiny_gpt2")


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str, **changes: object) -> DecoderConfig:
    cfg = build_config(compose("plan", overrides=[f"model={name}", "data=small"])).model
    assert isinstance(cfg, DecoderConfig)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def tiny(name: str = "tiny_decoder", **changes: object) -> Decoder:
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=512, **changes))
    assert isinstance(model, Decoder)
    return model.eval()


@pytest.mark.parametrize("name", [*PRESETS, "gpt2_124m", "gpt2_350m", "llama_1b", "llama_8b"])
def test_parameter_count_matches_accounting(name: str) -> None:
    cfg = preset(name)
    with torch.device("meta"):
        model = Decoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    if name == "gpt2_124m":  # nanoGPT's 123.69M: without the 1024 x 768 position table
        assert count_parameters(cfg).total - 1024 * 768 == 123_689_472


@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_and_flops_match_the_counter(name: str) -> None:
    model = tiny(name).train()
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    # the math backend decomposes attention into matmuls the counter sees
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
    assert torch.isfinite(loss)
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    expected = training_flops(cfg, 64).per_sequence * 2
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)


def test_init_scales_residual_projections() -> None:
    model = tiny(d_model=256, d_ff=688, n_layers=8)
    std = model.cfg.init_std
    assert model.blocks[0].attn.q.weight.std().item() == pytest.approx(std, rel=0.05)
    scaled = std / (2 * 8) ** 0.5
    assert model.blocks[3].attn.o.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[3].mlp.down.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


@pytest.mark.parametrize("name", PRESETS)
def test_document_mask_isolates_packed_documents(name: str) -> None:
    model = tiny(name)
    ids = torch.randint(0, 512, (1, 24))
    documents = torch.tensor([[0] * 10 + [1] * 14])
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    packed = model(ids, document_ids=documents, position_ids=positions)
    alone = model(ids[:, 10:])  # the second document on its own
    torch.testing.assert_close(packed[:, 10:], alone, atol=1e-5, rtol=1e-5)
    changed = ids.clone()
    changed[:, :10] = (changed[:, :10] + 1) % 512  # another first document
    repacked = model(changed, document_ids=documents, position_ids=positions)
    torch.testing.assert_close(repacked[:, 10:], packed[:, 10:], atol=1e-6, rtol=0)


def test_padding_keys_are_ignored() -> None:
    model = tiny()
    ids = torch.randint(0, 512, (2, 12))
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 8:] = False  # right padding
    batch = model(ids, padding_mask=padding)
    single = model(ids[1:, :8])
    torch.testing.assert_close(batch[1:, :8], single, atol=1e-5, rtol=1e-5)


def test_kv_cache_reproduces_full_forward_and_grows_linearly() -> None:
    model = tiny()
    ids = torch.randint(0, 512, (3, 20))
    full = model(ids)
    cache = DecoderCache(model, 3, 32)
    steps = [model(ids[:, :11], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(11, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    sizes = [DecoderCache(model, 3, length).nbytes() for length in (16, 32, 64)]
    cfg = model.cfg
    per_token = 2 * cfg.n_layers * 3 * cfg.resolved_kv_heads * cfg.resolved_head_dim * 4
    assert sizes == [per_token * 16, per_token * 32, per_token * 64]


@pytest.mark.parametrize("name", PRESETS)
def test_cached_and_uncached_generation_give_identical_tokens(name: str) -> None:
    model = tiny(name)
    prompts = [[5, 9, 13, 200, 7], [11, 3], [400, 401, 402]]  # different lengths: left padding
    for sampling in (
        SamplingConfig(max_new_tokens=12),
        SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=3),
        SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4),
    ):
        cached = generate(model, prompts, sampling, use_cache=True)
        uncached = generate(model, prompts, sampling, use_cache=False)
        assert cached == uncached
        assert [len(row) for row in cached] == [12, 12, 12]
    # a prompt's greedy continuation does not depend on the other rows (padding is inert)
    alone = generate(model, [prompts[1]], SamplingConfig(max_new_tokens=12))
    assert alone[0] == generate(model, prompts, SamplingConfig(max_new_tokens=12))[1]


def test_sampling_rules() -> None:
    model = tiny()
    prompts = [[5, 9, 13], [11, 3, 4]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=8))
    assert generate(model, prompts, SamplingConfig(8, temperature=1.0, top_k=1, seed=0)) == greedy
    tiny_p = SamplingConfig(8, temperature=1.0, top_p=1e-6, seed=0)
    assert generate(model, prompts, tiny_p) == greedy  # only the top token survives
    hot = SamplingConfig(8, temperature=5.0, seed=1)
    assert generate(model, prompts, hot) == generate(model, prompts, hot)  # seeded
    assert generate(model, prompts, hot) != greedy
    stop = greedy[0][3]
    stopped = generate(model, prompts, SamplingConfig(8, stop_tokens=(stop,)))
    first = greedy[0].index(stop)
    assert stopped[0] == greedy[0][: first + 1]
    if stop in greedy[1]:
        assert stopped[1] == greedy[1][: greedy[1].index(stop) + 1]
    else:
        assert stopped[1] == greedy[1]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_activation_checkpointing_keeps_loss_and_gradients(every: int) -> None:
    """Every block, or every `every`-th (`engine.activation_checkpointing_every`: blocks 0,
    every, 2 * every, ...), recomputed: the same loss and gradients, the same names."""
    ids = torch.randint(0, 512, (2, 32))

    def loss_and_grads(model: Decoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                 for n, p in model.named_parameters()}  # fmt: skip
        return loss, grads

    plain_loss, plain = loss_and_grads(tiny(n_layers=4))
    wrapped = apply_activation_checkpointing(tiny(n_layers=4), every)
    kinds = [type(block).__name__ for block in wrapped.blocks]
    assert kinds == ["CheckpointWrapper" if i % every == 0 else "Block" for i in range(4)]
    ckpt_loss, ckpt = loss_and_grads(wrapped)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert ckpt.keys() == plain.keys()
    assert wrapped.state_dict().keys() == tiny(n_layers=4).state_dict().keys()  # unchanged
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_block_forward_compiles_without_graph_breaks(name: str) -> None:
    import torch._dynamo

    model = tiny(name)
    ids = torch.randint(0, 512, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    documents = torch.tensor([[0] * 6 + [1] * 10] * 2)
    explanation = torch._dynamo.explain(model)(ids, document_ids=documents)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys() -> None:
    """`model.qk_norm`: each head's queries and keys are RMS-normalised before RoPE, so scaling
    the q and k projections (the logit growth QK-norm exists to stop) changes nothing, where it
    does without the norm; the norms' gains are counted, and the KV cache stores normalised
    keys (cached decoding reproduces the full forward)."""
    ids = torch.randint(0, 512, (2, 16))
    for qk_norm in (True, False):
        model = tiny(qk_norm=qk_norm, n_kv_heads=2)
        before = model(ids)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.q.weight.mul_(30.0)
                block.attn.k.weight.mul_(5.0)
        after = model(ids)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        else:
            assert (after - before).abs().max().item() > 0.1
    cfg = model.cfg
    assert model.blocks[0].attn.q_norm is None
    normed = tiny(qk_norm=True, n_kv_heads=2)
    added = sum(p.numel() for p in normed.parameters()) - sum(p.numel() for p in model.parameters())
    assert added == cfg.n_layers * 2 * cfg.resolved_head_dim
    assert count_parameters(normed.cfg).total - count_parameters(cfg).total == added
    cache = DecoderCache(normed, 2, 16)
    steps = [normed(ids[:, :9], cache=cache)]
    steps += [normed(ids[:, t : t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), normed(ids), atol=1e-5, rtol=1e-5)
