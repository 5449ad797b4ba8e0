"""Our learned-position decoder <-> transformers `GPT2LMHeadModel`.

Covers LayerNorm + learned positions + plain (ungated) MLP decoders with full multi-head
attention: GELU (exported as `activation_function="gelu"`, the exact erf form ours uses, not
GPT-2's tanh "gelu_new") or ReLU, tied or untied embeddings. GPT-2 always has biases; a model
built with `bias=false` exports with zero biases (the same function) and imports back with
`bias=true`.

Layout: GPT-2's `Conv1D` stores weights as (in, out), the transpose of `nn.Linear`, and fuses
the q, k and v projections into `attn.c_attn` (concatenated along the output dimension).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import DecoderConfig, ModelConfig
from pretrain.models.hf import BOS_ID, EOS_ID, PAD_ID, mismatch_error, plain_state_dict

if TYPE_CHECKING:
    from transformers import GPT2Config

HF_CLASS = "GPT2LMHeadModel"

ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}

# our name -> transformers name, for the norms and embeddings (same layout on both sides)
_GLOBAL = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "head.weight": "lm_head.weight",
}
_BLOCK_NORMS = {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
# our linear -> transformers Conv1D (transposed)
_BLOCK_LINEARS = {"attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
_THEIRS_BLOCK = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# buffers older GPT-2 checkpoints saved with the weights
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _problems(cfg: ModelConfig) -> list[str]:
    problems = []
    if not isinstance(cfg, DecoderConfig):
        problems.append(f"model family {cfg.family!r} (needs a decoder)")
    if cfg.position != "learned":
        problems.append(f"model.position={cfg.position!r} (needs 'learned')")
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'layernorm')")
    if cfg.activation not in ACTIVATIONS:
        problems.append(f"model.activation={cfg.activation!r} (needs an ungated 'gelu' or 'relu')")
    if cfg.resolved_kv_heads != cfg.n_heads:
        problems.append(
            f"model.n_kv_heads={cfg.n_kv_heads} (GPT-2 has no grouped-query attention; "
            f"needs model.n_heads={cfg.n_heads} or null)"
        )
    if cfg.d_model % cfg.n_heads or cfg.resolved_head_dim != cfg.d_model // cfg.n_heads:
        problems.append(
            f"model.head_dim={cfg.head_dim} (GPT-2 needs d_model / n_heads = "
            f"{cfg.d_model / cfg.n_heads:g})"
        )
    if cfg.attention_window is not None:
        problems.append(f"model.attention_window={cfg.attention_window} (no sliding window)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (no QK-norm)")
    if cfg.moe.n_experts:
        problems.append(f"model.moe.n_experts={cfg.moe.n_experts} (dense feed-forward only)")
    return problems


def hf_config(cfg: ModelConfig) -> GPT2Config:
    """The `GPT2Config` of `cfg`; ValueError naming every key it cannot express."""
    from transformers import GPT2Config

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function=ACTIVATIONS[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our decoder's weights under `GPT2LMHeadModel` names and layouts (no `lm_head` when
    tied; zero biases where ours has none)."""
    ours = plain_state_dict(model)
    like = ours["embed.weight"]
    width = like.shape[1]
    n_layers = len({int(m.group(1)) for key in ours if (m := re.match(r"blocks\.(\d+)\.", key))})
    state: dict[str, Tensor] = {}

    def bias_of(name: str, size: int) -> Tensor:
        bias = ours.pop(name, None)
        return bias if bias is not None else like.new_zeros(size)

    for name, theirs in _GLOBAL.items():
        if name in ours:
            state[theirs] = ours.pop(name)
    if "transformer.ln_f.bias" not in state:
        state["transformer.ln_f.bias"] = like.new_zeros(width)
    for i in range(n_layers):
        block, prefix = f"blocks.{i}", f"transformer.h.{i}"
        for norm, ln in _BLOCK_NORMS.items():
            state[f"{prefix}.{ln}.weight"] = ours.pop(f"{block}.{norm}.weight")
            state[f"{prefix}.{ln}.bias"] = bias_of(f"{block}.{norm}.bias", width)
        q, k, v = (ours.pop(f"{block}.attn.{p}.weight") for p in "qkv")
        state[f"{prefix}.attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
        state[f"{prefix}.attn.c_attn.bias"] = torch.cat(
            [bias_of(f"{block}.attn.{p}.bias", width) for p in "qkv"]
        )
        for linear, conv in _BLOCK_LINEARS.items():
            weight = ours.pop(f"{block}.{linear}.weight")
            state[f"{prefix}.{conv}.weight"] = weight.t().contiguous()
            state[f"{prefix}.{conv}.bias"] = bias_of(f"{block}.{linear}.bias", weight.shape[0])
    if ours:
        raise ValueError(f"{HF_CLASS} has no weights for our {sorted(ours)}")
    return state


def from_hf(hf_config: GPT2Config, state_dict: dict[str, Tensor]) -> tuple[DecoderConfig, dict]:
    """Our `DecoderConfig` and state dict for a GPT-2 checkpoint (ValueError naming the
    transformers option we cannot express). Accepts `GPT2Model` names (no `transformer.`)."""
    problems = []
    act = {value: key for key, value in ACTIVATIONS.items()}.get(hf_config.activation_function)
    if act is None:
        problems.append(
            f"activation_function={hf_config.activation_function!r} (needs 'gelu' (erf) or "
            "'relu'; ours has no tanh-approximated GELU)"
        )
    if not hf_config.scale_attn_weights:
        problems.append("scale_attn_weights=False")
    if hf_config.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(hf_config, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))
    width, n_layers = hf_config.n_embd, hf_config.n_layer
    name = Path(getattr(hf_config, "_name_or_path", "") or "gpt2").name or "gpt2"
    cfg = DecoderConfig(
        name=name,
        vocab_size=hf_config.vocab_size,
        d_model=width,
        n_layers=n_layers,
        n_heads=hf_config.n_head,
        d_ff=hf_config.n_inner or 4 * width,
        activation=act or "gelu",
        norm="layernorm",
        norm_eps=hf_config.layer_norm_epsilon,
        bias=True,
        position="learned",
        max_seq_len=hf_config.n_positions,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        dropout=float(hf_config.resid_pdrop),
        init_std=hf_config.initializer_range,
    )
    theirs = {}
    for key, tensor in state_dict.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = f"transformer.{key}"
        if not _IGNORED.fullmatch(key):
            theirs[key] = tensor
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    try:
        state = _split_weights(theirs, width, n_layers)
    except KeyError as error:
        raise ValueError(f"cannot import {HF_CLASS}: missing weight {error.args[0]!r}") from None
    if theirs:
        raise ValueError(f"cannot import {HF_CLASS}: unknown weights {sorted(theirs)}")
    return cfg, state


def _split_weights(theirs: dict[str, Tensor], width: int, n_layers: int) -> dict[str, Tensor]:
    """Pop GPT-2's weights from `theirs` into our names and layouts."""
    state: dict[str, Tensor] = {}
    for ours, key in _GLOBAL.items():
        if key in theirs:
            state[ours] = theirs.pop(key)
    for i in range(n_layers):
        block, prefix = f"blocks.{i}", f"transformer.h.{i}"
        for norm, ln in _BLOCK_NORMS.items():
            for kind in ("weight", "bias"):
                state[f"{block}.{norm}.{kind}"] = theirs.pop(f"{prefix}.{ln}.{kind}")
        fused = theirs.pop(f"{prefix}.attn.c_attn.weight").t()
        fused_bias = theirs.pop(f"{prefix}.attn.c_attn.bias")
        for p, weight, bias in zip("qkv", fused.split(width), fused_bias.split(width), strict=True):
            state[f"{block}.attn.{p}.weight"] = weight.contiguous()
            state[f"{block}.attn.{p}.bias"] = bias.contiguous()
        for linear, conv in _BLOCK_LINEARS.items():
            state[f"{block}.{linear}.weight"] = (
                theirs.pop(f"{prefix}.{conv}.weight").t().contiguous()
            )
            state[f"{block}.{linear}.bias"] = theirs.pop(f"{prefix}.{conv}.bias")
    return state
