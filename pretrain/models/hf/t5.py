"""Our `EncoderDecoder` <-> transformers' `T5ForConditionalGeneration`.

T5 is pre-norm RMSNorm without biases, with a bucketed relative position bias, full multi-head
attention and a ReLU (T5) or gated (T5 v1.1: GeGLU; SiLU-gated) feed-forward. A config outside
that (RoPE, LayerNorm, biases, grouped-query attention, ...) has no equivalent and `hf_config`
raises `ValueError` naming every such key.

Name map (stack s in encoder/decoder, layer i; the decoder's feed-forward is `layer.2`):

    embed.weight                        shared.weight, {encoder,decoder}.embed_tokens.weight
    s.relative_bias.embed.weight        s.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    s.blocks.i.attn.{q,k,v,o}.weight    s.block.i.layer.0.SelfAttention.{q,k,v,o}.weight
    s.blocks.i.attn_norm.weight         s.block.i.layer.0.layer_norm.weight
    decoder.blocks.i.cross_attn.*       decoder.block.i.layer.1.EncDecAttention.*
    decoder.blocks.i.cross_norm.weight  decoder.block.i.layer.1.layer_norm.weight
    s.blocks.i.mlp.up.weight            s.block.i.layer.{1,2}.DenseReluDense.wi.weight
    s.blocks.i.mlp.{gate,up}.weight     ... .DenseReluDense.{wi_0,wi_1}.weight (gated)
    s.blocks.i.mlp.down.weight          ... .DenseReluDense.wo.weight
    s.blocks.i.mlp_norm.weight          s.block.i.layer.{1,2}.layer_norm.weight
    s.norm.weight                       s.final_layer_norm.weight
    head.weight (untied only)           lm_head.weight (tied: left out)

Output scaling and tying: transformers scales the decoder output by d_model**-0.5 exactly when
the config was built with `tie_word_embeddings` not False. Since transformers 5 that choice is
kept as `scale_decoder_outputs`, `tie_word_embeddings` is then forced to True (the parameters
are tied at construction), and `from_pretrained` unties `lm_head` when the checkpoint's differs
from `shared.weight`. So the export builds the config with `tie_word_embeddings = tie_embeddings
and scale_logits_when_tied` (tied and unscaled: transformers 5 only), and for an untied model
sets `tie_word_embeddings = False` on the built config again, so a model constructed from it
holds a separate `lm_head` (and separate `embed_tokens`, which the state dict fills with the
shared embedding; `from_pretrained` ties those back since they are equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import EncoderDecoderConfig, ModelConfig
from pretrain.models.hf import EOS_ID, PAD_ID, mismatch_error, plain_state_dict

if TYPE_CHECKING:
    from transformers import T5Config

HF_CLASS: str = "T5ForConditionalGeneration"

# our activation -> transformers' `feed_forward_proj`. "gated-gelu" means the tanh
# approximation there ("gelu_new"); "gated-gelu_python" is the exact erf GELU that ours is.
_FEED_FORWARD = {
    "relu": "relu",
    "gelu": "gelu",
    "geglu": "gated-gelu_python",
    "swiglu": "gated-silu",
}
# transformers' `dense_act_fn` (with `is_gated_act`) -> our activation; exact forms only
_FROM_ACT = {
    (False, "relu"): "relu",
    (False, "gelu"): "gelu",
    (False, "gelu_python"): "gelu",
    (True, "gelu"): "geglu",
    (True, "gelu_python"): "geglu",
    (True, "silu"): "swiglu",
    (True, "swish"): "swiglu",
}
_ATTENTION = ("q", "k", "v", "o")


def _problems(cfg: ModelConfig) -> list[str]:
    if not isinstance(cfg, EncoderDecoderConfig):
        return [f"model family {cfg.family!r} (needs an encoder-decoder)"]
    problems = []
    if cfg.position != "relative":
        problems.append(f"model.position={cfg.position!r} (needs 'relative')")
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'rmsnorm')")
    if cfg.bias:
        problems.append("model.bias=True (T5 has no biases)")
    if cfg.activation not in _FEED_FORWARD:
        problems.append(f"model.activation={cfg.activation!r} (needs one of {list(_FEED_FORWARD)})")
    if cfg.resolved_kv_heads != cfg.n_heads:
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} (no grouped-query attention)")
    if cfg.attention_window is not None:
        problems.append(f"model.attention_window={cfg.attention_window} (no sliding window)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (no QK-norm)")
    if cfg.moe.n_experts:
        problems.append(f"model.moe.n_experts={cfg.moe.n_experts} (dense feed-forward only)")
    if cfg.tie_embeddings and not cfg.scale_logits_when_tied and not _unscaled_tie_supported():
        problems.append(
            "model.scale_logits_when_tied=False (transformers < 5 always scales tied logits)"
        )
    return problems


def hf_config(cfg: ModelConfig) -> T5Config:
    """The `T5Config` of an encoder-decoder config; ValueError naming every key it cannot
    express."""
    from transformers import T5Config

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    assert isinstance(cfg, EncoderDecoderConfig)
    config = T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.resolved_head_dim,
        d_ff=cfg.d_ff,
        num_layers=cfg.n_encoder_layers,
        num_decoder_layers=cfg.n_decoder_layers,
        num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=_FEED_FORWARD[cfg.activation],
        tie_word_embeddings=cfg.tie_embeddings and cfg.scale_logits_when_tied,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,  # T5 starts decoding from the pad id
    )
    if not cfg.tie_embeddings:
        config.tie_word_embeddings = False  # transformers 5 forces True in __post_init__
    return config


def _unscaled_tie_supported() -> bool:
    """transformers 5 separates output scaling from weight tying (`scale_decoder_outputs`)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _feed_forward_names(gated: bool) -> dict[str, str]:
    if gated:
        return {"gate": "wi_0", "up": "wi_1", "down": "wo"}
    return {"up": "wi", "down": "wo"}


def _block_map(cfg: EncoderDecoderConfig) -> dict[str, str]:
    """Every block parameter: our name -> transformers' name."""
    names: dict[str, str] = {}
    ff = _feed_forward_names(cfg.gated)
    for stack, n_layers in (("encoder", cfg.n_encoder_layers), ("decoder", cfg.n_decoder_layers)):
        ff_layer = 2 if stack == "decoder" else 1
        for i in range(n_layers):
            ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
            for proj in _ATTENTION:
                names[f"{ours}.attn.{proj}.weight"] = f"{theirs}.0.SelfAttention.{proj}.weight"
            names[f"{ours}.attn_norm.weight"] = f"{theirs}.0.layer_norm.weight"
            if stack == "decoder":
                for proj in _ATTENTION:
                    names[f"{ours}.cross_attn.{proj}.weight"] = (
                        f"{theirs}.1.EncDecAttention.{proj}.weight"
                    )
                names[f"{ours}.cross_norm.weight"] = f"{theirs}.1.layer_norm.weight"
            for name, hf_name in ff.items():
                names[f"{ours}.mlp.{name}.weight"] = (
                    f"{theirs}.{ff_layer}.DenseReluDense.{hf_name}.weight"
                )
            names[f"{ours}.mlp_norm.weight"] = f"{theirs}.{ff_layer}.layer_norm.weight"
        names[f"{stack}.norm.weight"] = f"{stack}.final_layer_norm.weight"
        names[f"{stack}.relative_bias.embed.weight"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        )
    return names


def _config_of(model: nn.Module) -> EncoderDecoderConfig:
    """The config of our model, through DDP's `.module` (compile forwards attributes)."""
    while not hasattr(model, "cfg") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    cfg = model.cfg
    assert isinstance(cfg, EncoderDecoderConfig), type(cfg)
    return cfg


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our encoder-decoder's weights under `T5ForConditionalGeneration` names (no `lm_head`
    when tied: transformers ties it to `shared`)."""
    cfg = _config_of(model)
    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    ours = dict(plain_state_dict(model))
    embed = ours.pop("embed.weight")
    state = {"shared.weight": embed}
    # the stacks' own embeddings: tied to `shared` in a model built from a tied config
    state["encoder.embed_tokens.weight"] = embed.clone()
    state["decoder.embed_tokens.weight"] = embed.clone()
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = ours.pop("head.weight")
    for name, theirs in _block_map(cfg).items():
        state[theirs] = ours.pop(name)
    if ours:
        raise ValueError(f"{HF_CLASS} has no weights for our {sorted(ours)}")
    return state


def from_hf(
    hf_config: T5Config, state_dict: dict[str, Tensor]
) -> tuple[EncoderDecoderConfig, dict]:
    """Our `EncoderDecoderConfig` and state dict for a T5 checkpoint (ValueError naming the
    transformers option we cannot express: an inexact activation such as "gated-gelu", which
    transformers runs as the tanh approximation, or an untied `lm_head` whose output is also
    scaled)."""
    problems = []
    key = (bool(hf_config.is_gated_act), hf_config.dense_act_fn)
    if key not in _FROM_ACT:
        problems.append(
            f"feed_forward_proj={hf_config.feed_forward_proj!r} (dense_act_fn="
            f"{hf_config.dense_act_fn!r}; needs relu, gelu (erf), gated-gelu_python or gated-silu)"
        )
    # transformers 5 keeps the scaling in `scale_decoder_outputs`; 4.x scales when tied
    scaled = bool(getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings))
    shared = next((state_dict[name] for name in ("shared.weight", "encoder.embed_tokens.weight",
                   "decoder.embed_tokens.weight") if name in state_dict), None)  # fmt: skip
    lm_head = state_dict.get("lm_head.weight")
    tied = lm_head is None or (shared is not None and torch.equal(lm_head, shared))
    if shared is None:
        problems.append("missing weight 'shared.weight'")
    elif scaled and not tied:
        problems.append(
            "lm_head.weight differs from shared.weight while the output is scaled by "
            "d_model**-0.5 (our untied head is never scaled)"
        )
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))
    name = Path(getattr(hf_config, "_name_or_path", "") or "t5").name or "t5"
    cfg = EncoderDecoderConfig(
        name=name,
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.d_model,
        n_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        d_ff=hf_config.d_ff,
        activation=_FROM_ACT[key],
        norm="rmsnorm",
        norm_eps=hf_config.layer_norm_epsilon,
        bias=False,
        position="relative",
        tie_embeddings=tied,
        scale_logits_when_tied=scaled or not tied,  # unused when untied
        dropout=float(hf_config.dropout_rate),
        n_encoder_layers=hf_config.num_layers,
        n_decoder_layers=hf_config.num_decoder_layers,
        relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
        relative_attention_max_distance=hf_config.relative_attention_max_distance,
    )
    assert shared is not None
    state = {"embed.weight": shared}
    if not tied:
        assert lm_head is not None
        state["head.weight"] = lm_head
    for ours, theirs in _block_map(cfg).items():
        if theirs not in state_dict:
            raise ValueError(f"cannot import {HF_CLASS}: missing weight {theirs!r}")
        state[ours] = state_dict[theirs]
    return cfg, state
