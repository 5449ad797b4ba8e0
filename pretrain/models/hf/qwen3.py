"""Our RoPE decoder with QK-norm <-> transformers `Qwen3ForCausalLM`.

Qwen3 is LLaMA's layout plus a per-head RMSNorm on queries and keys before RoPE (one gain of
`head_dim` shared by the heads: `model.qk_norm=true`, as ours), and per-layer sliding windows:
`layer_types` names each layer "sliding_attention" or "full_attention", which carries
`model.attention_window` and `model.global_every` (the last of every `global_every` layers
attends to the whole sequence). A window admits the keys less than `sliding_window` positions
back, as ours. The feed-forward has no biases, so `model.bias=true` has no equivalent;
attention sinks (`model.global_tokens`) have none in transformers at all.

`pretrain.models.hf.qwen2` reuses this module for windowed decoders without QK-norm
(`Qwen2ForCausalLM`, which has no q/k norms and always-present q/k/v biases, exported as
zeros). RoPE, its scaling and the weight names are LLaMA's (`pretrain.models.hf.llama`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig
from pretrain.models.hf import BOS_ID, EOS_ID, PAD_ID, mismatch_error, plain_state_dict
from pretrain.models.hf.llama import (
    _BLOCK,
    _GLOBAL,
    _GLOBAL_INVERSE,
    _OURS_BLOCK,
    _THEIRS_BLOCK,
    ACTIVATIONS,
    _rename,
    llama_layout,
    rope_from_hf,
    rope_parameters,
)
from pretrain.models.layers import global_layer

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

HF_CLASS = "Qwen3ForCausalLM"

SLIDING, FULL = "sliding_attention", "full_attention"

_QK_NORM = {"attn.q_norm.weight": "self_attn.q_norm.weight",
            "attn.k_norm.weight": "self_attn.k_norm.weight"}  # fmt: skip


def _block_names(qk_norm: bool) -> dict[str, str]:
    """Our block weight names -> theirs, without the biases neither class has."""
    names = {ours: theirs for ours, theirs in _BLOCK.items() if not ours.endswith(".bias")}
    if qk_norm:
        names |= _QK_NORM
    else:  # Qwen2: q, k and v always have biases
        names |= {f"attn.{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
    return names


def problems(cfg: ModelConfig, qk_norm: bool) -> list[str]:
    """Every `model.*` key that keeps `cfg` from Qwen3 (`qk_norm`) or Qwen2 (without)."""
    found = []
    if not isinstance(cfg, DecoderConfig):
        found.append(f"model family {cfg.family!r} (needs a decoder)")
    if cfg.position != "rope":
        found.append(f"model.position={cfg.position!r} (needs 'rope')")
    if cfg.norm != "rmsnorm":
        found.append(f"model.norm={cfg.norm!r} (needs 'rmsnorm')")
    if cfg.activation not in ACTIVATIONS:
        found.append(f"model.activation={cfg.activation!r} (needs a gated 'swiglu' or 'geglu')")
    if cfg.bias:
        found.append("model.bias=true (its feed-forward has no biases)")
    if cfg.moe.n_experts:
        found.append(f"model.moe.n_experts={cfg.moe.n_experts} (dense feed-forward only)")
    if cfg.qk_norm != qk_norm:
        found.append(f"model.qk_norm={str(cfg.qk_norm).lower()} (needs {str(qk_norm).lower()})")
    if cfg.global_tokens:
        found.append(
            f"model.global_tokens={cfg.global_tokens} (attention sinks: no transformers "
            "decoder keeps the first tokens visible to a sliding window)"
        )
    return found


def layer_types(cfg: ModelConfig) -> list[str]:
    """transformers' `layer_types` of `cfg`: sliding, except the global layers."""
    n_layers = cfg.n_layers  # type: ignore[attr-defined]
    if cfg.attention_window is None:
        return [FULL] * n_layers
    return [FULL if global_layer(cfg, i) else SLIDING for i in range(n_layers)]


def config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The arguments Qwen2Config and Qwen3Config share, for `cfg`."""
    window = cfg.attention_window
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,  # type: ignore[attr-defined]
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.resolved_kv_heads,
        head_dim=cfg.resolved_head_dim,
        hidden_act=ACTIVATIONS[cfg.activation],
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope_parameters(cfg),
        use_sliding_window=window is not None,
        sliding_window=window,
        layer_types=layer_types(cfg),
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def hf_config(cfg: ModelConfig) -> PreTrainedConfig:
    """The `Qwen3Config` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import Qwen3Config

    found = problems(cfg, qk_norm=True)
    if found:
        raise mismatch_error(HF_CLASS, found)
    return Qwen3Config(**config_kwargs(cfg), attention_bias=False)


def hf_state_dict(model: nn.Module, hf_class: str, qk_norm: bool) -> dict[str, Tensor]:
    """Our decoder's weights under `hf_class`'s names (no `lm_head` when tied); Qwen2's q/k/v
    biases, which our bias-free model lacks, as zeros."""
    import torch

    block = _block_names(qk_norm)
    state = {}
    for name, tensor in plain_state_dict(model).items():
        theirs = _rename(name, _GLOBAL, block, _OURS_BLOCK, "model.layers")
        if theirs is None:
            raise ValueError(f"{hf_class} has no weight for our {name!r}")
        state[theirs] = tensor
        if not qk_norm and name.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight")):
            state[theirs[: -len("weight")] + "bias"] = torch.zeros(
                tensor.shape[0], dtype=tensor.dtype
            )
    return state


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our decoder's weights under `Qwen3ForCausalLM` names (no `lm_head` when tied)."""
    return hf_state_dict(model, HF_CLASS, qk_norm=True)


def window_from_hf(hf_config: PreTrainedConfig, problems: list[str]) -> tuple[int | None, int]:
    """(model.attention_window, model.global_every) of a config's `layer_types`."""
    window = getattr(hf_config, "sliding_window", None)
    if not getattr(hf_config, "use_sliding_window", False):
        window = None
    types = list(getattr(hf_config, "layer_types", None) or [])
    unknown = sorted(set(types) - {SLIDING, FULL})
    if unknown:
        problems.append(f"layer_types {unknown} (needs {SLIDING!r} or {FULL!r})")
        return None, 0
    sliding = [kind == SLIDING for kind in types]
    if window is None or not any(sliding):
        return None, 0
    if all(sliding):
        return int(window), 0
    every = sliding.index(False) + 1  # the first full layer ends the first group
    if all(((i + 1) % every == 0) != slides for i, slides in enumerate(sliding)):
        return int(window), every
    problems.append(
        f"layer_types={types} (full attention must be every model.global_every-th layer)"
    )
    return None, 0


def decoder_from_hf(hf_config: PreTrainedConfig, state_dict: dict[str, Tensor], hf_class: str,
                    qk_norm: bool) -> tuple[DecoderConfig, dict]:  # fmt: skip
    """Our `DecoderConfig` and state dict for a Qwen2/Qwen3 checkpoint (ValueError naming what
    we cannot express)."""
    found = []
    act = {value: key for key, value in ACTIVATIONS.items()}.get(hf_config.hidden_act)
    if act is None:
        found.append(f"hidden_act={hf_config.hidden_act!r} (needs 'silu' or 'gelu')")
    if getattr(hf_config, "attention_bias", False):
        found.append("attention_bias=true (our biases switch the feed-forward's too)")
    scaling, theta = rope_from_hf(hf_config, found)
    window, every = window_from_hf(hf_config, found)
    if not qk_norm:  # Qwen2's q/k/v biases: ours has none, so they must be zero
        for key, tensor in state_dict.items():
            if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and tensor.any():
                found.append(f"{key} is not zero (our attention has no biases without mlp's)")
                break
    if found:
        raise ValueError(f"cannot import {hf_class}: " + "; ".join(found))
    cfg = DecoderConfig(
        **llama_layout(hf_config, "qwen"),
        activation=act or "swiglu",
        bias=False,
        rope_theta=theta,
        rope_scaling=scaling,
        attention_window=window,
        global_every=every,
        qk_norm=qk_norm,
    )
    inverse = {theirs: ours for ours, theirs in _block_names(qk_norm).items()}
    state = {}
    for key, tensor in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not qk_norm and key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            continue  # zero, checked above
        ours = _rename(key, _GLOBAL_INVERSE, inverse, _THEIRS_BLOCK, "blocks")
        if ours is None:
            raise ValueError(f"cannot import {hf_class}: unknown weight {key!r}")
        state[ours] = tensor
    return cfg, state


def from_hf(hf_config: PreTrainedConfig,
            state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:  # fmt: skip
    """Our `DecoderConfig` (with `qk_norm`) and state dict for a Qwen3 checkpoint."""
    return decoder_from_hf(hf_config, state_dict, HF_CLASS, qk_norm=True)
