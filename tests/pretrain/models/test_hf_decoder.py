"""Decoders to transformers and back: LlamaForCausalLM and GPT2LMHeadModel give our logits and
our greedy tokens, and importing the export reproduces the model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig

from pretrain.config import DecoderConfig, RopeScalingConfig, build_config, register_configs
from pretrain.models import apply_activation_checkpointing, build_model
from pretrain.models.hf import (
    ARCHITECTURES,
    NoEquivalentError,
    export_model,
    hf_module_for,
    import_model,
)

VOCAB = 640
TOLERANCE = 1e-4  # fp32 logits


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    register_configs()
    with initialize_config_module("hydra_conf", version_base="1.3"):
        yield


def preset(name: str, **changes: object) -> DecoderConfig:
    cfg = build_config(compose("plan", overrides=[f"model={name}", "data=small"])).model
    assert isinstance(cfg, DecoderConfig)
    cfg.vocab_size, cfg.max_seq_len = VOCAB, 64
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("tiny_decoder", {}),
    "llama_untied": ("tiny_decoder", {"tie_embeddings": False}),
    # explicit head dim, multi-query, biases, GeGLU, another base, linear rope scaling
    "llama_options": (
        "tiny_decoder",
        {
            "head_dim": 32,
            "n_kv_heads": 1,
            "bias": True,
            "activation": "geglu",
            "rope_theta": 500.0,
            "rope_scaling": RopeScalingConfig(kind="linear", factor=2.0),
        },
    ),
    "gpt2": ("tiny_gpt2", {}),
    "gpt2_untied": ("tiny_gpt2", {"tie_embeddings": False}),
    # QK-norm: Qwen3; with sliding windows and a global layer every second one, 3 layers
    "qwen3": ("tiny_decoder", {"qk_norm": True}),
    "qwen3_window": (
        "tiny_decoder",
        {
            "qk_norm": True,
            "attention_window": 5,
            "global_every": 2,
            "n_layers": 3,
            "head_dim": 32,
            "n_kv_heads": 1,
            "tie_embeddings": False,
        },
    ),  # fmt: skip
    # a window without QK-norm: Qwen2 (its q/k/v biases exported as zeros)
    "qwen2_window": ("tiny_decoder", {"attention_window": 6}),
    "qwen2_layers": ("tiny_decoder", {"attention_window": 4, "global_every": 3, "n_layers": 3}),
}
HF_CLASS = {"tiny_decoder": "LlamaForCausalLM", "tiny_gpt2": "GPT2LMHeadModel"}


def hf_class(variant: str) -> str:
    """The transformers class a variant exports as."""
    if variant.startswith("qwen"):
        return variant[:5].capitalize() + "ForCausalLM"
    return HF_CLASS[VARIANTS[variant][0]]


def randomized(cfg: DecoderConfig, seed: int = 0) -> nn.Module:
    """Our model with every weight (norms and biases too) moved off its init, so a weight
    mapped to the wrong place shows in the logits; larger weights give clear argmaxes."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@dataclass
class Exported:
    cfg: DecoderConfig
    model: nn.Module
    out: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("hf")
    result = {}
    for variant, (name, changes) in VARIANTS.items():
        cfg = preset(name, **changes)
        model = randomized(cfg)
        out = export_model(model, cfg, root / variant, tokenizer_path=None)
        result[variant] = Exported(cfg, model, out)
    return result


def left_padded_batch(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, positions) of 3 rows of 16, the last two left-padded by 5 and 11."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 16), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = mask[2, :11] = False
    ids[~mask] = 0
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_logits_match_ours(exported: dict[str, Exported], variant: str) -> None:
    case = exported[variant]
    hf = AutoModelForCausalLM.from_pretrained(case.out).eval()
    assert type(hf).__name__ == hf_class(variant)
    assert hf.config.tie_word_embeddings == case.cfg.tie_embeddings
    with safe_open(case.out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert ("lm_head.weight" in names) == (not case.cfg.tie_embeddings)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        ours = case.model(ids)
        theirs = hf(ids).logits
        assert (ours - theirs).abs().max().item() < TOLERANCE
        ours = case.model(ids, padding_mask=mask, position_ids=positions)
        theirs = hf(ids, attention_mask=mask.long(), position_ids=positions).logits
    assert (ours - theirs)[mask].abs().max().item() < TOLERANCE  # padding rows are unspecified


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_reproduces_the_model(exported: dict[str, Exported], variant: str) -> None:
    case = exported[variant]
    cfg, model = import_model(case.out)
    assert isinstance(cfg, DecoderConfig)
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "resolved_kv_heads",
                "resolved_head_dim", "d_ff", "activation", "norm", "norm_eps", "position",
                "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings", "qk_norm",
                "attention_window", "global_every"):  # fmt: skip
        assert getattr(cfg, key) == getattr(case.cfg, key), key
    ids, _, _ = left_padded_batch()
    with torch.no_grad():
        assert torch.allclose(model(ids), case.model(ids), atol=1e-6, rtol=0)


def greedy(model: nn.Module, ids: Tensor, mask: Tensor, steps: int) -> Tensor:
    """Argmax decoding with full (uncached) forwards of our model; returns the new tokens."""
    for _ in range(steps):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, padding_mask=mask, position_ids=positions)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, -steps:]


@pytest.mark.parametrize(
    "variant", ["llama", "llama_options", "gpt2_untied", "qwen3_window", "qwen2_layers"]
)
def test_generate_reproduces_our_greedy_tokens(exported: dict[str, Exported], variant: str) -> None:
    case = exported[variant]
    hf = AutoModelForCausalLM.from_pretrained(case.out).eval()
    ids, mask, _ = left_padded_batch(seed=2)
    steps = 12
    ours = greedy(case.model, ids, mask, steps)
    settings = GenerationConfig(
        do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0
    )
    theirs = hf.generate(ids, attention_mask=mask.long(), generation_config=settings)
    assert theirs.shape == (3, 16 + steps)
    assert theirs[:, 16:].tolist() == ours.tolist()


def test_bfloat16_export(tmp_path: Path) -> None:
    cfg = preset("tiny_decoder")
    model = randomized(cfg)
    out = export_model(model, cfg, tmp_path / "bf16", tokenizer_path=None, dtype=torch.bfloat16)
    with safe_open(out / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(name).dtype for name in list(weights.keys())}
    assert dtypes == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, _, _ = left_padded_batch()
    with torch.no_grad():
        error = (hf(ids).logits - model(ids)).abs().max().item()
    assert error < 0.1  # bf16 rounding of the weights only
    assert hf.generation_config.eos_token_id == 3 and hf.config.pad_token_id == 0


def test_registry_and_dispatch() -> None:
    for name in ("tiny_decoder", "tiny_gpt2"):
        module = hf_module_for(preset(name))
        assert HF_CLASS[name] == module.HF_CLASS
        assert ARCHITECTURES[module.HF_CLASS] == module.__name__
    with pytest.raises(NoEquivalentError, match="model.position='alibi'"):
        hf_module_for(preset("tiny_decoder", position="alibi"))


@pytest.mark.parametrize(
    ("name", "changes", "keys"),
    [
        ("tiny_decoder", {"norm": "layernorm", "activation": "gelu"},
         ["model.norm='layernorm'", "model.activation='gelu'"]),
        ("tiny_decoder", {"attention_window": 16, "global_tokens": 2},
         ["model.global_tokens=2 (attention sinks"]),
        ("tiny_decoder", {"attention_window": 8, "bias": True}, ["model.bias=true"]),
        ("tiny_decoder", {"qk_norm": True, "norm": "layernorm", "bias": True},
         ["model.norm='layernorm'", "model.bias=true"]),
        ("tiny_decoder", {"d_model": 66, "head_dim": 16}, ["model.d_model=66"]),
        ("tiny_gpt2", {"n_kv_heads": 2, "activation": "swiglu", "norm": "rmsnorm"},
         ["model.n_kv_heads=2", "model.activation='swiglu'", "model.norm='rmsnorm'"]),
        ("tiny_gpt2", {"head_dim": 32}, ["model.head_dim=32"]),
    ],
)  # fmt: skip
def test_mismatching_config_names_every_key(
    name: str, changes: dict, keys: list[str], tmp_path: Path
) -> None:
    cfg = preset(name, **changes)
    module = hf_module_for(cfg)
    with pytest.raises(ValueError) as error:
        module.hf_config(cfg)
    for key in keys:
        assert key in str(error.value)
    with pytest.raises(ValueError):  # checked before anything is built or written
        export_model(torch.nn.Linear(1, 1), cfg, tmp_path / "out", tokenizer_path=None)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path: Path) -> None:
    cfg = preset("tiny_gpt2")
    model = randomized(cfg)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(model, cfg, out, tokenizer_path=None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_model(model, cfg, out, tokenizer_path=None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directories left


def test_wrapped_model_exports_the_same_weights() -> None:
    cfg = preset("tiny_decoder")
    module = hf_module_for(cfg)
    plain = module.to_hf_state_dict(randomized(cfg))
    wrapped = module.to_hf_state_dict(apply_activation_checkpointing(randomized(cfg)))
    assert plain.keys() == wrapped.keys()
    assert all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_qwen_imports_name_what_we_cannot_express(tmp_path: Path) -> None:
    """A Qwen2 with real (non-zero) q/k/v biases, and a Qwen3 whose full-attention layers are
    not every n-th layer, are refused naming the weight and the layer types."""
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=True)  # fmt: skip
    qwen2 = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    with torch.no_grad():
        qwen2.model.layers[1].self_attn.k_proj.bias.fill_(0.5)
    qwen2.save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias is not zero"):
        import_model(tmp_path / "qwen2")
    with torch.no_grad():
        qwen2.model.layers[1].self_attn.k_proj.bias.zero_()
    qwen2.save_pretrained(tmp_path / "qwen2")
    cfg, _ = import_model(tmp_path / "qwen2")  # zero biases: our bias-free attention
    assert cfg.attention_window is None and not cfg.qk_norm and not cfg.bias

    types = ["full_attention", "sliding_attention", "sliding_attention"]
    qwen3 = tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, use_sliding_window=True,
                                               sliding_window=8, layer_types=types))  # fmt: skip
    qwen3.save_pretrained(tmp_path / "qwen3")
    with pytest.raises(ValueError, match="layer_types=.*every model.global_every-th layer"):
        import_model(tmp_path / "qwen3")
