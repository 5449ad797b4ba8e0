"""The T5-style encoder-decoder: parameter accounting, gradients, relative position bias,
cached decoding, padding, FLOPs, and logits equal to transformers' T5ForConditionalGeneration
through the Hugging Face mapping (both directions)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import EncoderDecoderConfig, build_config, register_configs
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.models.accounting import count_parameters, training_flops
from pretrain.models.encoder_decoder import (
    EncoderDecoder,
    EncoderDecoderCache,
    relative_position_bucket,
    shift_right,
)
from pretrain.models.hf import export_model, import_model, t5

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str, **changes: object) -> EncoderDecoderConfig:
    raw = compose("plan", overrides=[f"model={name}", "objective=span", "data.seq_len=128"])
    cfg = build_config(raw).model
    assert isinstance(cfg, EncoderDecoderConfig)
    return dataclasses.replace(cfg, **changes)


def batch(seed: int = 0, source: int = 20, target: int = 9) -> dict[str, torch.Tensor]:
    """Two examples; the second is right-padded on both sides."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 4096, (2, source), generator=generator)
    labels = torch.randint(4, 4096, (2, target), generator=generator)
    mask = torch.ones(2, source, dtype=torch.bool)
    mask[1, 13:] = False
    decoder_mask = torch.ones(2, target, dtype=torch.bool)
    decoder_mask[1, 6:] = False
    return {
        "input_ids": ids,
        "decoder_input_ids": shift_right(labels),
        "padding_mask": mask,
        "decoder_padding_mask": decoder_mask,
    }


def our_logits(model: EncoderDecoder, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            inputs["decoder_input_ids"],
            padding_mask=inputs["padding_mask"],
            decoder_padding_mask=inputs["decoder_padding_mask"],
        )


def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["padding_mask"].long(),
            decoder_input_ids=inputs["decoder_input_ids"],
            decoder_attention_mask=inputs["decoder_padding_mask"].long(),
        ).logits


def hf_model(cfg: EncoderDecoderConfig, ours: EncoderDecoder) -> torch.nn.Module:
    """T5ForConditionalGeneration from `hf_config`, holding exactly `to_hf_state_dict`: no key
    unused, and nothing missing but a tied `lm_head`, which transformers ties to `shared`."""
    model = transformers.T5ForConditionalGeneration(t5.hf_config(cfg)).eval()
    missing, unexpected = model.load_state_dict(t5.to_hf_state_dict(ours), strict=False)
    assert not unexpected
    assert set(missing) == ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert (model.lm_head.weight is model.shared.weight) == cfg.tie_embeddings
    return model


@pytest.mark.parametrize("name", ["tiny_encoder_decoder", "t5_base"])
def test_parameter_count_matches_accounting(name: str) -> None:
    cfg = preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, EncoderDecoder)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    assert len(model.encoder.blocks) == cfg.n_encoder_layers
    assert len(model.decoder.blocks) == cfg.n_decoder_layers


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"activation": "geglu", "tie_embeddings": False},
        {"position": "rope", "n_kv_heads": 2},
        {"qk_norm": True, "n_kv_heads": 2},
    ],
    ids=["t5", "v1.1", "rope-gqa", "qk-norm"],
)
def test_variant_counts_and_finite_gradients(changes: dict[str, object]) -> None:
    cfg = preset("tiny_encoder_decoder", **changes)
    torch.manual_seed(0)
    model = EncoderDecoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    inputs = batch()
    logits = model(inputs["input_ids"], inputs["decoder_input_ids"],
                   padding_mask=inputs["padding_mask"],
                   decoder_padding_mask=inputs["decoder_padding_mask"])  # fmt: skip
    logits.float().logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_activation_checkpointing_keeps_gradients() -> None:
    cfg = preset("tiny_encoder_decoder")
    inputs = batch()
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = EncoderDecoder(cfg)
        if checkpointed:
            apply_activation_checkpointing(model)
        model(**inputs).float().logsumexp(-1).mean().backward()
        grads.append({name.replace("_checkpoint_wrapped_module.", ""): p.grad
                      for name, p in model.named_parameters()})  # fmt: skip
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_init_follows_t5() -> None:
    cfg = preset("tiny_encoder_decoder", tie_embeddings=False)
    model = EncoderDecoder(cfg)
    block = model.decoder.blocks[0]
    d, head_dim, inner, d_ff = 64, 16, 64, 256
    expected = {
        "embed": (model.embed.weight, 1.0),
        "q": (block.attn.q.weight, (d * head_dim) ** -0.5),
        "k": (block.cross_attn.k.weight, d**-0.5),
        "o": (block.attn.o.weight, inner**-0.5),
        "wi": (block.mlp.up.weight, d**-0.5),
        "wo": (block.mlp.down.weight, d_ff**-0.5),
        "head": (model.head.weight, d**-0.5),
    }
    for name, (weight, std) in expected.items():
        assert weight.std().item() == pytest.approx(std, rel=0.1), name
    assert torch.equal(model.encoder.norm.weight, torch.ones(d))


def test_relative_buckets_match_transformers() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 20)):
            ours = relative_position_bucket(relative, bidirectional=bidirectional,
                                            num_buckets=buckets, max_distance=distance)  # fmt: skip
            theirs = T5Attention._relative_position_bucket(
                relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            assert torch.equal(ours, theirs)


VARIANTS = {
    "t5": {},
    "v1.1-geglu-untied": {"activation": "geglu", "tie_embeddings": False},
    "swiglu-tied-unscaled": {"activation": "swiglu", "scale_logits_when_tied": False},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_and_round_trip(variant: str) -> None:
    cfg = preset("tiny_encoder_decoder", **VARIANTS[variant])
    if not cfg.scale_logits_when_tied and not t5._unscaled_tie_supported():
        pytest.skip("transformers < 5 scales tied T5 logits")
    torch.manual_seed(0)
    ours = EncoderDecoder(cfg).eval()
    with torch.no_grad():  # norm weights away from 1, so a swapped norm would show
        for name, param in ours.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    hf = hf_model(cfg, ours)
    inputs = batch()
    real = inputs["decoder_padding_mask"]
    expected = hf_logits(hf, inputs)
    assert (our_logits(ours, inputs) - expected)[real].abs().max().item() < 1e-4

    # transformers -> ours: a fresh model loads the state dict and reproduces the logits
    new_cfg, state = t5.from_hf(hf.config, hf.state_dict())
    for key in ("vocab_size", "d_model", "n_heads", "head_dim", "d_ff", "activation",
                "n_encoder_layers", "n_decoder_layers", "tie_embeddings", "norm_eps",
                "relative_attention_num_buckets", "relative_attention_max_distance"):  # fmt: skip
        assert getattr(new_cfg, key) == getattr(cfg, key), key
    if cfg.tie_embeddings:
        assert new_cfg.scale_logits_when_tied == cfg.scale_logits_when_tied
    loaded = EncoderDecoder(new_cfg).eval()
    loaded.load_state_dict(state, strict=True)
    assert (our_logits(loaded, inputs) - expected)[real].abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_directory_loads_in_transformers_and_imports_back(tmp_path, variant: str) -> None:
    cfg = preset("tiny_encoder_decoder", **VARIANTS[variant])
    if not cfg.scale_logits_when_tied and not t5._unscaled_tie_supported():
        pytest.skip("transformers < 5 scales tied T5 logits")
    torch.manual_seed(1)
    ours = EncoderDecoder(cfg).eval()
    out = export_model(ours, cfg, tmp_path / "t5", tokenizer_path=None)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert type(hf).__name__ == t5.HF_CLASS
    inputs = batch()
    real = inputs["decoder_padding_mask"]
    assert (hf_logits(hf, inputs) - our_logits(ours, inputs))[real].abs().max().item() < 1e-4
    new_cfg, loaded = import_model(out)
    assert (new_cfg.tie_embeddings, new_cfg.activation) == (cfg.tie_embeddings, cfg.activation)
    assert (our_logits(loaded, inputs) - our_logits(ours, inputs))[real].abs().max() < 1e-5


def test_hf_config_activations_and_refusals() -> None:
    geglu = t5.hf_config(preset("tiny_encoder_decoder", activation="geglu"))
    assert geglu.is_gated_act and geglu.dense_act_fn == "gelu_python"  # exact, not gelu_new
    assert t5.hf_config(preset("tiny_encoder_decoder")).feed_forward_proj == "relu"
    assert t5.hf_config(preset("tiny_encoder_decoder", activation="swiglu")).dense_act_fn == "silu"
    for key, changes in [
        ("position", {"position": "rope"}),
        ("norm", {"norm": "layernorm"}),
        ("bias", {"bias": True}),
        ("n_kv_heads", {"n_kv_heads": 2}),
    ]:
        with pytest.raises(ValueError, match=f"model.{key}"):
            t5.hf_config(preset("tiny_encoder_decoder", **changes))
    approximate = transformers.T5Config(feed_forward_proj="gated-gelu")  # tanh GELU
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.from_hf(approximate, {})


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_cached_decoding_matches_uncached(position: str) -> None:
    cfg = preset("tiny_encoder_decoder", position=position)
    torch.manual_seed(0)
    model = EncoderDecoder(cfg).eval()
    inputs = batch(target=12)
    targets = inputs["decoder_input_ids"]
    with torch.no_grad():
        memory = model.encode(inputs["input_ids"], padding_mask=inputs["padding_mask"])
        full = model.decode(targets, memory, memory_padding_mask=inputs["padding_mask"])
        cache = EncoderDecoderCache(model, batch=2, capacity=16)
        steps = [model.decode(targets[:, :3], memory, cache=cache,
                              memory_padding_mask=inputs["padding_mask"])]  # fmt: skip
        for t in range(3, targets.shape[1]):
            steps.append(model.decode(targets[:, t : t + 1], memory, cache=cache,
                                      memory_padding_mask=inputs["padding_mask"]))  # fmt: skip
    assert cache.length == targets.shape[1]
    assert cache.nbytes() == 2 * 2 * (2 * 4 * 16 * 16 + 2 * 4 * 20 * 16) * 4  # self + cross
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)


def test_padding_is_ignored() -> None:
    model = EncoderDecoder(preset("tiny_encoder_decoder")).eval()
    inputs = batch()
    changed = dict(inputs)
    changed["input_ids"] = inputs["input_ids"].clone()
    changed["input_ids"][1, 13:] = 9
    changed["decoder_input_ids"] = inputs["decoder_input_ids"].clone()
    changed["decoder_input_ids"][1, 6:] = 9
    real = inputs["decoder_padding_mask"]
    torch.testing.assert_close(our_logits(model, inputs)[real], our_logits(model, changed)[real],
                               rtol=0, atol=1e-5)  # fmt: skip
    # the padded example alone, unpadded, gives the same logits
    alone = {
        "input_ids": inputs["input_ids"][1:, :13],
        "decoder_input_ids": inputs["decoder_input_ids"][1:, :6],
        "padding_mask": inputs["padding_mask"][1:, :13],
        "decoder_padding_mask": inputs["decoder_padding_mask"][1:, :6],
    }
    torch.testing.assert_close(our_logits(model, alone)[0], our_logits(model, inputs)[1, :6],
                               rtol=0, atol=1e-4)  # fmt: skip


def test_shift_right() -> None:
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels).tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]
    assert shift_right(labels, start_id=2, pad_id=1).tolist() == [[2, 5, 6, 7], [2, 8, 1, 1]]
    assert EncoderDecoder.decoder_start_token_id == 0


def test_flops_match_flop_counter() -> None:
    """training_flops against FlopCounterMode on our own module, forward + backward, with the
    math SDPA backend so the counter sees the score matmuls."""
    enc_len, dec_len, rows = 128, 32, 2
    cfg = preset("tiny_encoder_decoder")
    model = EncoderDecoder(cfg)
    ids = torch.randint(0, cfg.vocab_size, (rows, enc_len))
    decoder_ids = torch.randint(0, cfg.vocab_size, (rows, dec_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, decoder_ids).sum().backward()
    predicted = training_flops(cfg, enc_len, dec_len).per_sequence * rows
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.05)
