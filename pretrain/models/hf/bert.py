"""Our `Encoder` <-> transformers' `BertForMaskedLM`.

BERT is post-norm with LayerNorm, biases, learned positions and an ungated activation; a config
outside that (pre-norm, RMSNorm, RoPE, SwiGLU, ...) has no `BertForMaskedLM` equivalent and
`hf_config` raises `ValueError` naming every such key. `BertForMaskedLM` has no pooler, so neither does
the mapping: a model with `pooler=true` does not export, and pooler weights in a transformers
state dict (`bert.pooler.*`, e.g. from a `BertForPreTraining` checkpoint) are ignored on import,
as `BertForMaskedLM.from_pretrained` ignores them.

Name map (layer i):

    embed.weight                      bert.embeddings.word_embeddings.weight
    pos_embed.weight                  bert.embeddings.position_embeddings.weight
    type_embed.weight                 bert.embeddings.token_type_embeddings.weight
    embed_norm.*                      bert.embeddings.LayerNorm.*
    blocks.i.attn.{q,k,v}.*           bert.encoder.layer.i.attention.self.{query,key,value}.*
    blocks.i.attn.o.*                 bert.encoder.layer.i.attention.output.dense.*
    blocks.i.attn_norm.*              bert.encoder.layer.i.attention.output.LayerNorm.*
    blocks.i.mlp.up.*                 bert.encoder.layer.i.intermediate.dense.*
    blocks.i.mlp.down.*               bert.encoder.layer.i.output.dense.*
    blocks.i.mlp_norm.*               bert.encoder.layer.i.output.LayerNorm.*
    head.dense.*                      cls.predictions.transform.dense.*
    head.norm.*                       cls.predictions.transform.LayerNorm.*
    head.proj.weight (untied only)    cls.predictions.decoder.weight (tied: left out)
    head.bias                         cls.predictions.bias, cls.predictions.decoder.bias

Our `type_vocab_size=0` exports as `type_vocab_size=1` with a zero token-type row (which adds
nothing), and imports back as 0 when that row is zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.config import EncoderConfig, ModelConfig
from pretrain.models.hf import PAD_ID, mismatch_error, plain_state_dict

if TYPE_CHECKING:
    from transformers import BertConfig

HF_CLASS: str = "BertForMaskedLM"

# transformers' `hidden_act` names that are our activations exactly (GELU: the erf form)
_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}

_LAYER = {  # our block parameter -> transformers' name under bert.encoder.layer.{i}.
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp.up": "intermediate.dense",
    "mlp.down": "output.dense",
    "mlp_norm": "output.LayerNorm",
}
_TOP = {  # our parameter -> transformers' name, outside the layers
    "embed": "bert.embeddings.word_embeddings",
    "pos_embed": "bert.embeddings.position_embeddings",
    "type_embed": "bert.embeddings.token_type_embeddings",
    "embed_norm": "bert.embeddings.LayerNorm",
    "head.dense": "cls.predictions.transform.dense",
    "head.norm": "cls.predictions.transform.LayerNorm",
}


def _problems(cfg: ModelConfig) -> list[str]:
    if not isinstance(cfg, EncoderConfig):
        return [f"model family {cfg.family!r} (needs an encoder)"]
    problems = []
    if cfg.norm_position != "post":
        problems.append(f"model.norm_position={cfg.norm_position!r} (needs 'post')")
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm!r} (needs 'layernorm')")
    if not cfg.bias:
        problems.append("model.bias=False (BERT has biases in every linear and LayerNorm)")
    if cfg.position != "learned":
        problems.append(f"model.position={cfg.position!r} (needs 'learned')")
    if cfg.activation not in ("gelu", "relu"):
        problems.append(f"model.activation={cfg.activation!r} (needs an ungated 'gelu' or 'relu')")
    if not cfg.embedding_norm:
        problems.append("model.embedding_norm=False (BERT normalises the embedding sum)")
    if not cfg.mlm_head_transform:
        problems.append("model.mlm_head_transform=False (BERT's MLM head has its transform)")
    if cfg.pooler:
        problems.append(f"model.pooler=True ({HF_CLASS} has no pooler; set model.pooler=false)")
    if cfg.resolved_kv_heads != cfg.n_heads:
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} (no grouped-query attention)")
    if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
        problems.append(f"model.head_dim={cfg.head_dim} (needs d_model / n_heads)")
    if cfg.attention_window is not None:
        problems.append(f"model.attention_window={cfg.attention_window} (no sliding window)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (no QK-norm)")
    if cfg.moe.n_experts:
        problems.append(f"model.moe.n_experts={cfg.moe.n_experts} (dense feed-forward only)")
    return problems


def hf_config(cfg: ModelConfig) -> BertConfig:
    """The `BertConfig` of an encoder config; ValueError naming every key it cannot express."""
    from transformers import BertConfig

    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    assert isinstance(cfg, EncoderConfig)
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=cfg.activation,  # "gelu" is the exact erf GELU in transformers
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=max(cfg.type_vocab_size, 1),
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
    )


def _config_of(model: nn.Module) -> EncoderConfig:
    """The config of our encoder, through DDP's `.module` (compile forwards attributes)."""
    while not hasattr(model, "cfg") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    cfg = model.cfg
    assert isinstance(cfg, EncoderConfig), type(cfg)
    return cfg


def to_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our encoder's weights under `BertForMaskedLM` names (no `cls.predictions.decoder.weight`
    when tied: transformers ties it to the word embeddings)."""
    cfg = _config_of(model)
    problems = _problems(cfg)
    if problems:
        raise mismatch_error(HF_CLASS, problems)
    ours = dict(plain_state_dict(model))
    state: dict[str, Tensor] = {}
    for name, theirs in _TOP.items():
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in ours:
                state[f"{theirs}.{suffix}"] = ours.pop(f"{name}.{suffix}")
    if cfg.type_vocab_size == 0:  # one token type whose embedding adds nothing
        state["bert.embeddings.token_type_embeddings.weight"] = state[
            "bert.embeddings.word_embeddings.weight"
        ].new_zeros(1, cfg.d_model)
    for i in range(cfg.n_layers):
        for name, theirs in _LAYER.items():
            for suffix in ("weight", "bias"):
                state[f"bert.encoder.layer.{i}.{theirs}.{suffix}"] = ours.pop(
                    f"blocks.{i}.{name}.{suffix}"
                )
    if not cfg.tie_embeddings:
        state["cls.predictions.decoder.weight"] = ours.pop("head.proj.weight")
    # one bias under both names: a tied model shares them, an untied one reads the decoder's
    bias = ours.pop("head.bias")
    state["cls.predictions.bias"], state["cls.predictions.decoder.bias"] = bias, bias.clone()
    if ours:
        raise ValueError(f"{HF_CLASS} has no weights for our {sorted(ours)}")
    return state


def from_hf(hf_config: BertConfig, state_dict: dict[str, Tensor]) -> tuple[EncoderConfig, dict]:
    """Our `EncoderConfig` and state dict for a BERT checkpoint (ValueError naming the
    transformers option we cannot express).

    Keys may carry the `bert.` prefix (`BertForMaskedLM`, `BertForPreTraining`) or not
    (`BertModel`); pooler and next-sentence weights are ignored, as `BertForMaskedLM` ignores
    them. The output head is tied when the config says so and the checkpoint has no other
    `cls.predictions.decoder.weight`.
    """
    problems = []
    act = hf_config.hidden_act
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (needs 'gelu' (erf) or 'relu')")
    position_type = getattr(hf_config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        problems.append(f"position_embedding_type={position_type!r} (needs 'absolute')")
    if getattr(hf_config, "is_decoder", False):
        problems.append("is_decoder=True (a causal BERT is not a bidirectional encoder)")
    if problems:
        raise ValueError(f"cannot import {HF_CLASS}: " + "; ".join(problems))

    def get(name: str) -> Tensor | None:
        for key in (name, name.removeprefix("bert.")):
            if key in state_dict:
                return state_dict[key]
        return None

    def need(*names: str) -> Tensor:
        for name in names:
            tensor = get(name)
            if tensor is not None:
                return tensor
        raise ValueError(f"cannot import {HF_CLASS}: missing weight {names[0]!r}")

    word = need("bert.embeddings.word_embeddings.weight")
    decoder = get("cls.predictions.decoder.weight")
    tied = bool(hf_config.tie_word_embeddings) and (decoder is None or torch.equal(decoder, word))
    if decoder is None and not tied:
        raise ValueError(
            f"cannot import {HF_CLASS}: missing weight 'cls.predictions.decoder.weight'"
        )
    types = need("bert.embeddings.token_type_embeddings.weight")
    type_vocab_size = 0 if types.shape[0] == 1 and not types.any() else types.shape[0]
    name = Path(getattr(hf_config, "_name_or_path", "") or "bert").name or "bert"
    cfg = EncoderConfig(
        name=name,
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        d_ff=hf_config.intermediate_size,
        activation=_ACTIVATIONS[act],
        norm="layernorm",
        norm_eps=hf_config.layer_norm_eps,
        bias=True,
        position="learned",
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=tied,
        dropout=float(hf_config.hidden_dropout_prob),
        init_std=hf_config.initializer_range,
        n_layers=hf_config.num_hidden_layers,
        type_vocab_size=type_vocab_size,
        embedding_norm=True,
        norm_position="post",
        pooler=False,
        mlm_head_transform=True,
    )
    state: dict[str, Tensor] = {}
    for ours, theirs in _TOP.items():
        if ours == "type_embed" and type_vocab_size == 0:
            continue
        for suffix in ("weight", "bias"):
            tensor = get(f"{theirs}.{suffix}")
            if tensor is not None:
                state[f"{ours}.{suffix}"] = tensor
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            for suffix in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{suffix}"] = need(
                    f"bert.encoder.layer.{i}.{theirs}.{suffix}"
                )
    if not tied:
        assert decoder is not None
        state["head.proj.weight"] = decoder
        # an untied BertForMaskedLM adds the bias it reads as `cls.predictions.decoder.bias`
        state["head.bias"] = need("cls.predictions.decoder.bias", "cls.predictions.bias")
    else:
        state["head.bias"] = need("cls.predictions.bias", "cls.predictions.decoder.bias")
    return cfg, state
