"""Exact parameter counts and training FLOPs for the three model families, from the config alone.

Conventions (used by `kiln plan` and for MFU; see README "FLOP convention"):

* Training FLOPs = 3 x forward FLOPs (backward costs twice the forward); a multiply-add is 2 FLOPs.
* Weight FLOPs are `6 * N` per token, where N counts every parameter that takes part in a matmul
  for that token: all block weights (norms and biases included, as in PaLM's 6N), the output
  projection (counted once even when tied to the token embedding) and, for MoE, only the router
  and the `top_k` routed experts (plus shared experts). Lookup tables (an untied token embedding,
  learned positions, token types) are not matmuls and are excluded.
* Attention FLOPs are `12 * L * H * Q * T_ctx` per token (PaLM appendix B, nanoGPT): Q.K^T and
  A.V over the full context, with no halving for causal masking, which is also what
  `torch.utils.flop_counter.FlopCounterMode` counts for `scaled_dot_product_attention`.
  `T_ctx` is the sequence length, or for sliding-window attention the window (plus
  `global_tokens`) in windowed blocks and the sequence length in global ones (`global_every`).
* The output head counts at the positions it runs on: every position, except for masked LM,
  whose loss needs (and whose encoder computes) the vocabulary logits at the masked positions
  only (`objective.mask_prob` of them; `head_fraction`).
* Encoder-decoder FLOPs are per example and reported per *input* (encoder) token: weight FLOPs
  `6 * (N_enc * S_enc + N_dec * S_dec)` where the cross-attention K/V projections multiply
  S_enc tokens, attention `12 * H * Q * (L_e * S_enc^2 + L_d * S_dec^2 + L_d * S_enc * S_dec)`,
  logits `6 * d * V * S_dec`.

This module is plain arithmetic: it imports no torch, so `kiln plan` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import (
    DecoderConfig,
    EncoderConfig,
    EncoderDecoderConfig,
    MaskedLMConfig,
    ModelConfig,
    ObjectiveConfig,
)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model config.

    Attributes:
        total: every parameter (a tied embedding counted once).
        active: parameters one token passes through (MoE: router + top_k experts + dense part).
        lookup: embedding-table parameters used only as lookups (excluded from matmul FLOPs).
        largest_unit: parameters of the largest sharding unit (a block, or the embedding or
            output projection), which FSDP and ZeRO-3 gather whole.
        n_blocks: transformer blocks (encoder plus decoder blocks for encoder-decoders).
    """

    total: int
    active: int
    lookup: int
    largest_unit: int
    n_blocks: int

    @property
    def matmul_active(self) -> int:
        """Active parameters that take part in matmuls for one token."""
        return self.active - self.lookup


def linear_params(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def norm_params(model: ModelConfig, width: int | None = None) -> int:
    """RMSNorm has a weight; LayerNorm a weight and, when `model.bias`, a bias (over `width`
    features, default `d_model`; a head's for QK-norm)."""
    return (width or model.d_model) * (2 if model.norm == "layernorm" and model.bias else 1)


def attention_params(model: ModelConfig) -> int:
    d, inner = model.d_model, model.n_heads * model.resolved_head_dim
    kv_inner = model.resolved_kv_heads * model.resolved_head_dim
    return (
        linear_params(d, inner, model.bias)  # q
        + 2 * linear_params(d, kv_inner, model.bias)  # k, v
        + linear_params(inner, d, model.bias)  # o
        + (2 * norm_params(model, model.resolved_head_dim) if model.qk_norm else 0)
    )


def cross_attention_kv_params(model: ModelConfig) -> int:
    """The K and V projections of a cross-attention, which run over encoder tokens."""
    kv_inner = model.resolved_kv_heads * model.resolved_head_dim
    return 2 * linear_params(model.d_model, kv_inner, model.bias)


def mlp_params(model: ModelConfig, d_ff: int) -> int:
    d = model.d_model
    up = linear_params(d, d_ff, model.bias) * (2 if model.gated else 1)
    return up + linear_params(d_ff, d, model.bias)


def is_moe_block(model: ModelConfig, index: int) -> bool:
    """Block `index` (0-based) has an MoE feed-forward: every k-th block, the last of each k."""
    k = model.moe.every_k_layers
    return model.moe.n_experts > 0 and (index + 1) % k == 0


def feed_forward_params(model: ModelConfig, index: int) -> tuple[int, int]:
    """(total, active) parameters of block `index`'s feed-forward."""
    if not is_moe_block(model, index):
        dense = mlp_params(model, model.d_ff)
        return dense, dense
    moe = model.moe
    expert = mlp_params(model, moe.d_expert or model.d_ff)
    router = model.d_model * moe.n_experts
    shared = moe.n_shared_experts * expert
    total = router + moe.n_experts * expert + shared
    active = router + moe.top_k * expert + shared
    return total, active


def self_attention_block_params(model: ModelConfig, index: int) -> tuple[int, int]:
    """(total, active) parameters of a pre/post-norm block: two norms, attention, feed-forward."""
    fixed = 2 * norm_params(model) + attention_params(model)
    ff_total, ff_active = feed_forward_params(model, index)
    return fixed + ff_total, fixed + ff_active


def relative_bias_params(model: EncoderDecoderConfig) -> int:
    """T5 keeps one bucketed bias table in the first block of each stack."""
    return (
        model.relative_attention_num_buckets * model.n_heads if model.position == "relative" else 0
    )


def count_parameters(model: ModelConfig) -> ParamCounts:
    """Exact parameter counts for a model config (matches the modules in pretrain/models)."""
    if isinstance(model, EncoderDecoderConfig):
        return _count_encoder_decoder(model)
    d, vocab = model.d_model, model.vocab_size
    token_embedding = vocab * d
    positions = model.max_seq_len * d if model.position == "learned" else 0
    output = 0 if model.tie_embeddings else vocab * d
    extra = 0
    if isinstance(model, EncoderConfig):
        positions += model.type_vocab_size * d
        extra += norm_params(model) if model.embedding_norm else 0
        extra += norm_params(model) if model.norm_position == "pre" else 0  # final norm
        extra += linear_params(d, d, model.bias) if model.pooler else 0
        if model.mlm_head_transform:
            extra += linear_params(d, d, model.bias) + norm_params(model)
        output += vocab if model.bias else 0  # MLM output bias
    elif isinstance(model, DecoderConfig):
        extra += norm_params(model)  # final norm
    else:  # pragma: no cover - the config module defines exactly three families
        raise TypeError(f"unknown model family {type(model).__name__}")
    blocks = [self_attention_block_params(model, i) for i in range(model.n_layers)]
    blocks_total = sum(total for total, _ in blocks)
    blocks_active = sum(active for _, active in blocks)
    lookup = positions + (0 if model.tie_embeddings else token_embedding)
    fixed = token_embedding + positions + output + extra
    return ParamCounts(
        total=fixed + blocks_total,
        active=fixed + blocks_active,
        lookup=lookup,
        largest_unit=max([token_embedding, output] + [total for total, _ in blocks]),
        n_blocks=model.n_layers,
    )


def _count_encoder_decoder(model: EncoderDecoderConfig) -> ParamCounts:
    d, vocab = model.d_model, model.vocab_size
    shared = vocab * d
    output = 0 if model.tie_embeddings else vocab * d
    encoder = [self_attention_block_params(model, i) for i in range(model.n_encoder_layers)]
    cross = norm_params(model) + attention_params(model)
    decoder = [
        (total + cross, active + cross)
        for total, active in (
            self_attention_block_params(model, i) for i in range(model.n_decoder_layers)
        )
    ]
    fixed = shared + output + 2 * norm_params(model) + 2 * relative_bias_params(model)
    blocks = encoder + decoder
    return ParamCounts(
        total=fixed + sum(total for total, _ in blocks),
        active=fixed + sum(active for _, active in blocks),
        lookup=0 if model.tie_embeddings else shared,
        largest_unit=max([shared, output] + [total for total, _ in blocks]),
        n_blocks=len(blocks),
    )


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs (forward + backward) for one sequence and per token.

    Attributes:
        per_token: FLOPs per training token (per encoder input token for encoder-decoders).
        per_sequence: FLOPs for one training sequence (one example).
        weights: the 6N part of `per_sequence`.
        attention: the attention-score part of `per_sequence`.
        tokens_per_sequence: the tokens `per_token` divides by.
    """

    per_token: float
    per_sequence: float
    weights: float
    attention: float
    tokens_per_sequence: int


def attention_context(model: ModelConfig, seq_len: int, layer: int = 0) -> int:
    """Keys a query of block `layer` attends to: the window (plus the global tokens) in a
    windowed block, the whole sequence in a global one (`model.global_every`)."""
    is_global = model.global_every > 0 and (layer + 1) % model.global_every == 0
    if not model.attention_window or is_global:
        return seq_len
    return min(seq_len, model.attention_window + model.global_tokens)


def head_params(model: ModelConfig) -> int:
    """Matmul parameters of the output head: the vocabulary projection (and its bias), with an
    encoder's MLM transform (dense + norm) when it has one."""
    head = model.vocab_size * model.d_model
    if isinstance(model, EncoderConfig):
        head += model.vocab_size if model.bias else 0
        if model.mlm_head_transform:
            head += linear_params(model.d_model, model.d_model, model.bias) + norm_params(model)
    return head


def head_fraction(objective: ObjectiveConfig) -> float:
    """The share of positions the output head runs on: masked LM computes (and needs) the
    vocabulary logits at the masked positions only, `objective.mask_prob` of them."""
    return objective.mask_prob if isinstance(objective, MaskedLMConfig) else 1.0


def training_flops(
    model: ModelConfig,
    seq_len: int,
    decoder_seq_len: int | None = None,
    head_share: float = 1.0,
) -> FlopsPerToken:
    """Training FLOPs per token under the module's convention.

    Args:
        model: the model config.
        seq_len: tokens per sequence (the encoder input length for encoder-decoders).
        decoder_seq_len: decoder (target) length, encoder-decoders only.
        head_share: the share of positions the output head runs on (`head_fraction`: masked
            LM's mask rate; 1 for every other objective, and for the logits of every position).
    """
    counts = count_parameters(model)
    inner = model.n_heads * model.resolved_head_dim
    if isinstance(model, EncoderDecoderConfig):
        if decoder_seq_len is None:
            raise ValueError("encoder-decoder FLOPs need decoder_seq_len")
        return _encoder_decoder_flops(model, seq_len, decoder_seq_len)
    head = head_params(model)
    weights = 6.0 * ((counts.matmul_active - head) + head * head_share) * seq_len
    contexts = sum(attention_context(model, seq_len, layer) for layer in range(model.n_layers))
    attention = 12.0 * inner * contexts * seq_len
    per_sequence = weights + attention
    return FlopsPerToken(per_sequence / seq_len, per_sequence, weights, attention, seq_len)


def _encoder_decoder_flops(
    model: EncoderDecoderConfig, encoder_len: int, decoder_len: int
) -> FlopsPerToken:
    encoder_active = sum(
        self_attention_block_params(model, i)[1] for i in range(model.n_encoder_layers)
    ) + norm_params(model)
    cross_kv = cross_attention_kv_params(model)
    cross_rest = norm_params(model) + attention_params(model) - cross_kv
    decoder_active = (
        sum(self_attention_block_params(model, i)[1] for i in range(model.n_decoder_layers))
        + model.n_decoder_layers * cross_rest
        + norm_params(model)
    )
    logits = model.vocab_size * model.d_model
    weights = 6.0 * (
        encoder_active * encoder_len
        + model.n_decoder_layers * cross_kv * encoder_len
        + (decoder_active + logits) * decoder_len
    )
    inner = model.n_heads * model.resolved_head_dim
    enc_ctx = attention_context(model, encoder_len)
    dec_ctx = attention_context(model, decoder_len)
    attention = (
        12.0
        * inner
        * (
            model.n_encoder_layers * encoder_len * enc_ctx
            + model.n_decoder_layers * decoder_len * dec_ctx
            + model.n_decoder_layers * decoder_len * encoder_len
        )
    )
    per_sequence = weights + attention
    return FlopsPerToken(per_sequence / encoder_len, per_sequence, weights, attention, encoder_len)
