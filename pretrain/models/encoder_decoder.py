"""T5-style encoder-decoder, chosen by config:

- T5: one token embedding shared by both stacks (and by the output when tied), pre-norm
  RMSNorm blocks without biases, bucketed relative position bias (bidirectional in the encoder,
  causal in the decoder; one table per stack, reused by every layer of that stack), attention
  scores not scaled by 1/sqrt(D) (the init absorbs it), decoder blocks with cross-attention
  that carries no position bias, a final RMSNorm per stack and tied logits scaled by
  d_model**-0.5 (`model=tiny_encoder_decoder`, `t5_base`);
- T5 v1.1 / UL2 variants: gated feed-forwards (`activation=geglu`), an untied output head;
- RoPE instead of the relative bias (`position=rope`; self-attention only).

`encode` runs the encoder once; `decode` runs the decoder over (a step of) the target, reading
and extending an `EncoderDecoderCache` for incremental generation. The decoder starts from the
pad id (`shift_right`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.config import EncoderDecoderConfig
from pretrain.models.layers import (
    Block,
    BlockInputs,
    LayerCache,
    RotaryEmbedding,
    build_attention_mask,
    build_norm,
)
from pretrain.models.loss import OutputHead, linear_cross_entropy_terms
from pretrain.models.moe import init_feed_forward


def shift_right(labels: Tensor, start_id: int = 0, pad_id: int = 0) -> Tensor:
    """Decoder inputs from (B, T) targets: `start_id`, then the targets but the last; ignored
    label positions (-100) become `pad_id`."""
    shifted = labels.new_full(labels.shape, start_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


def relative_position_bucket(
    relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of each `key - query` offset (Mesh TensorFlow's scheme).

    Half the buckets (per direction when bidirectional) hold the offsets 0, 1, 2, ... exactly;
    the rest grow logarithmically up to `max_distance`, beyond which offsets share the last.
    A causal stack only sees keys at or before the query, so later keys all map to bucket 0.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets  # keys after the query
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # how far back the key is
    exact = num_buckets // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A (buckets, H) table of learned per-head score offsets, indexed by the bucketed
    key - query distance. T5 keeps it in the first layer of a stack; every layer adds it."""

    def __init__(self, cfg: EncoderDecoderConfig, *, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embed = nn.Embedding(cfg.relative_attention_num_buckets, cfg.n_heads)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(1, H, T, S) bias for (T,) query and (S,) key absolute positions."""
        relative = key_positions[None, :] - query_positions[:, None]  # (T, S)
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.embed(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


class Stack(nn.Module):
    """One side of the model: blocks, an optional relative-bias table and the final norm.

    The token embedding is not part of a stack (the model shares one between both).
    """

    def __init__(self, cfg: EncoderDecoderConfig, *, decoder: bool, n_layers: int) -> None:
        super().__init__()
        self.is_decoder = decoder
        self.relative_bias = (
            RelativePositionBias(cfg, bidirectional=not decoder)
            if cfg.position == "relative"
            else None
        )
        self.blocks = nn.ModuleList(
            Block(cfg, causal=decoder, cross_attention=decoder, scale=1.0, index=i)
            for i in range(n_layers)
        )
        self.norm = build_norm(cfg)

    def self_attention_mask(
        self,
        query_positions: Tensor,
        key_positions: Tensor,
        key_padding: Tensor | None,
        *,
        cached: bool = False,
    ) -> Tensor | None:
        """The self-attention mask every block shares.

        Args:
            query_positions: (T,) absolute positions of the queries.
            key_positions: (S,) absolute positions of the keys (with a cache, 0..S-1).
            key_padding: (B, S) True for real keys.
            cached: the decoder reads a cache, so SDPA's causal kernel (which assumes T == S
                and no offset) cannot stand in for the mask.

        Returns:
            The relative bias (1 or B, H, T, S) with -inf where a key is hidden; without a
            bias table (RoPE), a boolean (B or 1, 1, T, S) mask, or None for full attention
            (encoder) or SDPA's causal kernel (decoder).
        """
        causal = self.is_decoder
        if self.relative_bias is None:
            if key_padding is None and not cached:
                return None
            return build_attention_mask(
                query_positions, key_positions, causal=causal, key_padding=key_padding
            )  # (B or 1, 1, T, S)
        bias = self.relative_bias(query_positions, key_positions)  # (1, H, T, S)
        if key_padding is None and not causal:
            return bias
        allowed = build_attention_mask(
            query_positions, key_positions, causal=causal, key_padding=key_padding
        )  # (B or 1, 1, T, S)
        return bias.masked_fill(~allowed, float("-inf"))  # (B or 1, H, T, S)

    def forward(
        self,
        x: Tensor,
        inputs: BlockInputs,
        caches: list[LayerCache] | None = None,
        cross_caches: list[LayerCache] | None = None,
    ) -> Tensor:
        """(B, T, C) embeddings -> (B, T, C) normed outputs."""
        n = len(self.blocks)
        caches = caches if caches is not None else [None] * n
        cross_caches = cross_caches if cross_caches is not None else [None] * n
        for block, cache, cross_cache in zip(self.blocks, caches, cross_caches, strict=True):
            x = block(x, inputs, cache, cross_cache)
        return self.norm(x)


class EncoderDecoderCache:
    """The decoder's caches for incremental decoding: per block, a preallocated self-attention
    `LayerCache` and a cross-attention `LayerCache` (the encoder's keys and values, computed on
    the first `decode` call and reused after), plus the decoder's key padding."""

    def __init__(self, model: EncoderDecoder, batch: int, capacity: int) -> None:
        param = next(model.parameters())
        cfg = model.cfg
        self.layers = [LayerCache() for _ in model.decoder.blocks]
        for layer in self.layers:
            layer.allocate(batch, cfg.resolved_kv_heads, capacity, cfg.resolved_head_dim,
                           param.dtype, param.device)  # fmt: skip
        self.cross_layers = [LayerCache() for _ in model.decoder.blocks]
        self.key_padding = torch.ones(batch, capacity, dtype=torch.bool, device=param.device)

    @property
    def length(self) -> int:
        """Decoder tokens cached so far."""
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers + self.cross_layers)


class EncoderDecoder(nn.Module):
    """Input ids (B, S) and decoder input ids (B, T) -> next-token logits (B, T, V)."""

    decoder_start_token_id = 0  # T5 starts the decoder from the pad id

    def __init__(self, cfg: EncoderDecoderConfig) -> None:
        super().__init__()
        if cfg.attention_window is not None:
            raise NotImplementedError("model.attention_window: T5 attends to the whole sequence")
        if cfg.position not in ("relative", "rope"):
            raise ValueError(f"model.position={cfg.position!r} is not 'relative' or 'rope'")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by both stacks
        self.drop = nn.Dropout(cfg.dropout)  # on the embeddings, in training only
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.encoder = Stack(cfg, decoder=False, n_layers=cfg.n_encoder_layers)
        self.decoder = Stack(cfg, decoder=True, n_layers=cfg.n_decoder_layers)
        self.head = None if cfg.tie_embeddings else OutputHead(cfg.d_model, cfg.vocab_size, False)
        self.loss_chunk_tokens = 0  # as `Decoder.loss_chunk_tokens`
        self.loss_chunk_compiled = False
        self.z_loss = 0.0  # as `Decoder.z_loss`
        self.last_z_loss: Tensor | None = None
        self.step_z_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5's recipe (Mesh TensorFlow, factor 1; `init_std` is not used): embedding N(0, 1);
        q N(0, (C * D)**-0.5), k and v N(0, C**-0.5), o N(0, (H * D)**-0.5); feed-forward in
        N(0, C**-0.5), out N(0, d_ff**-0.5); relative bias and an untied head N(0, C**-0.5);
        norms at 1, biases at 0. An MoE router gets Switch Transformer's 0.1 scale,
        N(0, (0.1 / C)**0.5): on the unit-RMS normed states its logits start with std 0.32
        at any width, so the routing probabilities start near uniform, as the decoder's do
        (T5's C**-0.5 gives std-1 logits: confident routing, a large z-loss)."""
        cfg = self.cfg
        d, inner = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim
        nn.init.normal_(self.embed.weight, std=1.0)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=d**-0.5)
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for stack in (self.encoder, self.decoder):
            if stack.relative_bias is not None:
                nn.init.normal_(stack.relative_bias.embed.weight, std=d**-0.5)
            for block in stack.blocks:
                attentions = [block.attn] + ([block.cross_attn] if block.cross_attn else [])
                for attn in attentions:
                    nn.init.normal_(attn.q.weight, std=(d * cfg.resolved_head_dim) ** -0.5)
                    nn.init.normal_(attn.k.weight, std=d**-0.5)
                    nn.init.normal_(attn.v.weight, std=d**-0.5)
                    nn.init.normal_(attn.o.weight, std=inner**-0.5)
                init_feed_forward(block.mlp, d**-0.5, None, router_std=(0.1 / d) ** 0.5)

    def encode(self, input_ids: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        """Run the encoder.

        Args:
            input_ids: (B, S) token ids.
            padding_mask: (B, S) True for real tokens; padding keys are never attended to,
                and MoE layers route only the real tokens.

        Returns:
            (B, S, C) encoder outputs (the decoder's cross-attention memory).
        """
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)  # (S,)
        inputs = BlockInputs(
            rope=self.rope(positions.expand(batch, length)) if self.rope is not None else None,
            mask=self.encoder.self_attention_mask(positions, positions, padding_mask),
            padding_mask=padding_mask,
        )
        return self.encoder(self.drop(self.embed(input_ids)), inputs)

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        *,
        memory_padding_mask: Tensor | None = None,
        decoder_padding_mask: Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        labels: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Run the decoder over `decoder_input_ids`, after whatever `cache` holds.

        Args:
            decoder_input_ids: (B, T) target ids shifted right (`shift_right`); with a cache,
                only the new ones.
            memory: (B, S, C) output of `encode`.
            memory_padding_mask: (B, S) True for real encoder tokens.
            decoder_padding_mask: (B, T) True for real decoder tokens; padding keys are never
                attended to and MoE layers route only the real tokens (with a cache, the mask
                of the new tokens only).
            cache: an `EncoderDecoderCache` to read and extend; its positions continue from
                `cache.length`, so the position bias uses absolute query positions.
            labels: (B, T) targets (-100: none): return their mean fp32 cross-entropy instead
                (in chunks of `loss_chunk_tokens` tokens when set, `linear_cross_entropy`;
                in training plus the z-loss when `z_loss` is set).
            reduction: with `labels`, "mean", or "none" for each position's loss (B, T).

        Returns:
            (B, T, V) logits, or the loss.
        """
        batch, length = decoder_input_ids.shape
        device = decoder_input_ids.device
        past = cache.length if cache is not None else 0
        positions = torch.arange(past, past + length, device=device)  # (T,)
        key_positions, key_padding = positions, decoder_padding_mask
        if cache is not None:
            end = past + length
            if decoder_padding_mask is not None:
                cache.key_padding[:, past:end] = decoder_padding_mask
            key_padding = cache.key_padding[:, :end]  # (B, past + T)
            key_positions = torch.arange(end, device=device)
        context_mask = None
        if memory_padding_mask is not None:
            context_mask = memory_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        inputs = BlockInputs(
            rope=self.rope(positions.expand(batch, length)) if self.rope is not None else None,
            mask=self.decoder.self_attention_mask(
                positions, key_positions, key_padding, cached=cache is not None
            ),
            context=memory,
            context_mask=context_mask,
            padding_mask=decoder_padding_mask,
        )
        caches = cache.layers if cache is not None else None
        cross_caches = cache.cross_layers if cache is not None else None
        x = self.decoder(self.drop(self.embed(decoder_input_ids)), inputs, caches, cross_caches)
        chunk, compiled = self.loss_chunk_tokens, self.loss_chunk_compiled
        z_loss = self.z_loss if self.training else 0.0  # evaluation: the cross-entropy alone
        if self.head is not None:
            if labels is None:
                return self.head(x)
            loss, term = self.head(x, labels, chunk, compiled=compiled, reduction=reduction,
                                   z_loss=z_loss)  # fmt: skip
        else:
            if self.cfg.scale_logits_when_tied:
                x = x * self.cfg.d_model**-0.5
            if labels is None:
                return x @ self.embed.weight.T  # (B, T, V)
            loss, term = linear_cross_entropy_terms(x, self.embed.weight, None, labels, chunk,
                                                    compiled, reduction, z_loss)  # fmt: skip
        if term is not None:
            self.last_z_loss = term
        return loss

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        *,
        padding_mask: Tensor | None = None,
        decoder_padding_mask: Tensor | None = None,
        labels: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Teacher-forced logits (B, T, V): `decode(encode(input_ids), ...)`; with `labels`,
        their loss (`reduction="none"`: each position's)."""
        memory = self.encode(input_ids, padding_mask=padding_mask)
        return self.decode(
            decoder_input_ids,
            memory,
            memory_padding_mask=padding_mask,
            decoder_padding_mask=decoder_padding_mask,
            labels=labels,
            reduction=reduction,
        )
