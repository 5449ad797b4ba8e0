"""Our RoPE decoder <-> transformers `LlamaForCausalLM`.

Covers RMSNorm + RoPE + gated MLP decoders: SwiGLU (`hidden_act="silu"`) or GeGLU (`"gelu"`,
the exact erf form, as ours), grouped-query attention, an explicit head dim, biases
(`attention_bias`/`mlp_bias`), tied or untied embeddings, `rope_theta`, and rope scaling
"linear" (`rope_parameters={"rope_type": "linear", "factor": f}`), "yarn" (`rope_type: yarn`
with `original_max_position_embeddings`, `beta_fast`, `beta_slow`, `attention_factor`,
`truncate`; DeepSeek's `mscale`/`mscale_all_dim` import as the attention factor they give) and
"ntk" (a static change of base, exported as plain RoPE with the scaled theta, so it imports
back as kind "none"; transformers' "dynamic" NTK depends on the input length and is refused).

Our RoPE uses the "rotate half" layout, as transformers' LLaMA does, so q/k need no
permutation; weights are renamed only. `dropout` is a training option and is not carried.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig, RopeScalingConfig
from pretrain.models.hf import BOS_ID, EOS_ID, PAD_ID, mismatch_error, plain_state_dict

if TYPE_CHECKING:
    from transformers import LlamaConfig

HF_CLASS = "LlamaForCausalLM"

ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}

KINDS = ("weight", "bias")
# our name -> transformers name; "{i}" is a block index
_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in KINDS},
    **{f"mlp.{p}.{kind}": f"mlp.{p}_proj.{kind}" for p in ("gate", "up", "down") for kind in KINDS},
}
_BLOCK_INVERSE = {theirs: ours for ours, theirs in _BLOCK.items()}
_GLOBAL_INVERSE = {theirs: ours for ours, theirs in _GLOBAL.items()}
_OURS_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_THEIRS_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _problems(cfg: ModelConfig) -> list[str]:
    problems = []
    if not isinstance(cfg, DecoderConfig):
        problems.append(f"model family {cfg.family!r} (needs a decoder)")
    if cfg.position != "rope":
        problems.append(f"model.position={cfg.position!r} (needs 'rope')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'rmsnorm')")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"model.activation={cfg.activation!r} (needs a gated 'swiglu' or 'geglu')")
    if cfg.attention_window is not None:
        problems.append(
            f"model.attention_window={cfg.attention_window} (no sliding window; "
            "Qwen2ForCausalLM has one)"
        )
    if cfg.moe.n_experts:
        problems.append(f"model.moe.n_experts={cfg.moe.n_experts} (dense feed-forward only)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (no QK-norm; Qwen3ForCausalLM has it)")
    if cfg.d_model % cfg.n_heads:
        problems.append(
            f"model.d_model={cfg.d_model} is not a multiple of model.n_heads={cfg.n_heads} "
            "(LlamaConfig requires it even with an explicit model.head_dim)"
        )
    return problems


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' `rope_parameters` for `cfg`'s RoPE and its scaling (shared by the LLaMA-
    layout classes: LLaMA, Qwen2, Qwen3)."""
    head_dim = cfg.resolved_head_dim
    scaling = cfg.rope_scaling
    rope: dict = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if scaling.kind == "linear":
        rope = {"rope_type": "linear", "rope_theta": float(cfg.rope_theta),
                "factor": float(scaling.factor)}  # fmt: skip
    elif scaling.kind == "ntk":  # our NTK-aware scaling is a fixed, larger base
        rope["rope_theta"] = float(cfg.rope_theta * scaling.factor ** (head_dim / (head_dim - 2)))
    elif scaling.kind == "yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": float(cfg.rope_theta),
            "factor": float(scaling.factor),
            "original_max_position_embeddings": int(
                scaling.original_max_seq_len or max(1, round(cfg.max_seq_len / scaling.factor))
            ),
            "beta_fast": float(scaling.beta_fast),
            "beta_slow": float(scaling.beta_slow),
            "truncate": bool(scaling.truncate),
        }
        if scaling.attention_factor is not None:  # else theirs is ours: 0.1 ln(factor) + 1
            rope["attention_factor"] = float(scaling.attention_factor)
    return rope


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    """The `LlamaConfig` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import LlamaConfig

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    head_dim = cfg.resolved_head_dim
    rope = rope_parameters(cfg)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.resolved_kv_heads,
        head_dim=head_dim,
        hidden_act=ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _yarn_from_hf(rope: dict, max_position_embeddings: int) -> RopeScalingConfig:
    """Our YaRN settings from transformers' `rope_parameters` (their defaults where absent)."""
    import math

    original = int(rope.get("original_max_position_embeddings") or max_position_embeddings)
    factor = rope.get("factor") or max_position_embeddings / original
    attention = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim and factor > 1:
        attention = (0.1 * mscale * math.log(factor) + 1) / (
            0.1 * mscale_all_dim * math.log(factor) + 1
        )
    return RopeScalingConfig(
        kind="yarn",
        factor=float(factor),
        original_max_seq_len=original,
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        attention_factor=None if attention is None else float(attention),
        truncate=bool(rope.get("truncate", True)),
    )


def llama_layout(hf_config: Any, default_name: str) -> dict[str, Any]:
    """The `DecoderConfig` fields every LLaMA-layout transformers config (LLaMA, Qwen2/3,
    Mixtral) gives the same way: widths, heads, norm, positions' table size, tying, init."""
    heads = hf_config.num_attention_heads
    kv_heads = hf_config.num_key_value_heads or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    name = Path(getattr(hf_config, "_name_or_path", "") or default_name).name or default_name
    return dict(
        name=name,
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=None if kv_heads == heads else kv_heads,
        head_dim=None if head_dim == hf_config.hidden_size // heads else head_dim,
        d_ff=hf_config.intermediate_size,
        norm="rmsnorm",
        norm_eps=hf_config.rms_norm_eps,
        position="rope",
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=hf_config.initializer_range,
    )


def rope_from_hf(hf_config, problems: list[str]) -> tuple[RopeScalingConfig, float]:
    """(our rope scaling, rope_theta) from a LLaMA-layout config's `rope_parameters`; what we
    cannot express is appended to `problems`."""
    rope = dict(hf_config.rope_parameters or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn"):
        problems.append(
            f"rope_parameters.rope_type={rope_type!r} (needs 'default', 'linear' or 'yarn')"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (needs 1.0)")
    scaling = RopeScalingConfig()
    if rope_type == "linear":
        scaling = RopeScalingConfig(kind="linear", factor=float(rope["factor"]))
    elif rope_type == "yarn":
        scaling = _yarn_from_hf(rope, hf_config.max_position_embeddings)
    return scaling, float(rope.get("rope_theta", 10000.0))


def _rename(name: str, flat: dict[str, str], block: dict[str, str],
            pattern: re.Pattern[str], prefix: str) -> str | None:  # fmt: skip
    if name in flat:
        return flat[name]
    match = pattern.fullmatch(name)
    if match and match.group(2) in block:
        return f"{prefix}.{match.group(1)}.{block[match.group(2)]}"
    return None


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our decoder's weights under `LlamaForCausalLM` names (no `lm_head` when tied)."""
    state = {}
    for name, tensor in plain_state_dict(model).items():
        theirs = _rename(name, _GLOBAL, _BLOCK, _OURS_BLOCK, "model.layers")
        if theirs is None:
            raise ValueError(f"{HF_CLASS} has no weight for our {name!r}")
        state[theirs] = tensor
    return state


def from_hf(hf_config: LlamaConfig, state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:
    """Our `DecoderConfig` and state dict for a LLaMA checkpoint (ValueError naming the
    transformers option we cannot express)."""
    problems = []
    act = {value: key for key, value in ACTIVATIONS.items()}.get(hf_config.hidden_act)
    if act is None:
        problems.append(f"hidden_act={hf_config.hidden_act!r} (needs 'silu' or 'gelu')")
    if bool(hf_config.attention_bias) != bool(hf_config.mlp_bias):
        problems.append(
            f"attention_bias={hf_config.attention_bias} with mlp_bias={hf_config.mlp_bias} "
            "(we have one bias switch)"
        )
    scaling, theta = rope_from_hf(hf_config, problems)
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))
    cfg = DecoderConfig(**llama_layout(hf_config, "llama"), activation=act or "swiglu",
                        bias=bool(hf_config.attention_bias), rope_theta=theta,
                        rope_scaling=scaling)  # fmt: skip
    state = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        ours = _rename(key, _GLOBAL_INVERSE, _BLOCK_INVERSE, _THEIRS_BLOCK, "blocks")
        if ours is None:
            raise ValueError(f"cannot import {HF_CLASS}: unknown weight {key!r}")
        state[ours] = tensor
    return cfg, state
