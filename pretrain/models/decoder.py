"""GPT/LLaMA-style causal decoder, chosen by config:

- LLaMA: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases (`model=tiny_decoder`,
  `llama_1b`, `llama_8b`);
- GPT-2: LayerNorm with biases, learned positions, GELU (`model=tiny_gpt2`, `gpt2_124m`).

Any other mix of the same switches also builds (e.g. RoPE with LayerNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import DecoderConfig
from pretrain.models.layers import (
    Block,
    BlockInputs,
    LayerCache,
    RotaryEmbedding,
    SequenceShard,
    alibi_slopes,
    apply_alibi,
    build_attention_mask,
    build_norm,
    init_normal,
    residual_std,
)
from pretrain.models.loss import OutputHead, linear_cross_entropy_terms
from pretrain.models.moe import init_feed_forward


class DecoderCache:
    """The KV cache of a whole decoder: one `LayerCache` per block, plus the key padding."""

    def __init__(self, model: Decoder, batch: int, capacity: int) -> None:
        param = next(model.parameters())
        self.layers = [LayerCache() for _ in model.blocks]
        for layer in self.layers:
            layer.allocate(batch, model.cfg.resolved_kv_heads, capacity,
                           model.cfg.resolved_head_dim, param.dtype, param.device)  # fmt: skip
        self.key_padding = torch.ones(batch, capacity, dtype=torch.bool, device=param.device)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class Decoder(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V), or given labels the loss."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        slopes = alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, causal=True, index=i) for i in range(cfg.n_layers))
        self.drop = nn.Dropout(cfg.dropout)  # on the embeddings, in training only
        self.norm = build_norm(cfg)
        self.head = None if cfg.tie_embeddings else OutputHead(cfg.d_model, cfg.vocab_size, False)
        self.sequence_shard: SequenceShard | None = None  # set by context parallelism
        # tokens per chunk of the head + cross-entropy when given labels (engine.
        # loss_chunk_tokens; 0: the logits whole), and whether each chunk's softmax and
        # gradient run compiled (engine.compile outside a compiled forward)
        self.loss_chunk_tokens = 0
        self.loss_chunk_compiled = False
        # objective.z_loss: the weight of the z-loss its training loss adds (0: none), and the
        # weighted term of the last training forward, detached, for the log (`collect_z_loss`)
        self.z_loss = 0.0
        self.last_z_loss: Tensor | None = None
        self.step_z_loss: Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute ALiBi's slopes (in no state dict) of a model built empty (`empty_model`)."""
        if self.alibi_slopes is not None:
            self.alibi_slopes.copy_(alibi_slopes(self.cfg.n_heads))

    def reset_parameters(self) -> None:
        """GPT-2's recipe: N(0, init_std) everywhere, residual projections scaled by
        1/sqrt(2 * n_layers), norms at 1."""
        init_normal(self, self.cfg.init_std)
        scaled = residual_std(self.cfg.init_std, self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.o.weight, std=scaled)
            init_feed_forward(block.mlp, self.cfg.init_std, scaled)

    def forward(
        self,
        input_ids: Tensor,
        *,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        labels: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Logits for every position, or with `labels` their mean fp32 cross-entropy.

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T) positions (restarting at each document of a packed row, or
                shifted past left padding); default 0..T-1 after what the cache holds.
            document_ids: (B, T) document of each token in a packed row; attention stays
                inside a document.
            padding_mask: (B, T) True for real tokens; padding keys are never attended to,
                and MoE layers route only the real tokens.
            cache: a `DecoderCache` to read and extend (incremental decoding).
            labels: (B, T) next-token targets (-100: none): return the loss, computed in
                chunks of `loss_chunk_tokens` tokens when that is set (`linear_cross_entropy`);
                in training its mean has the z-loss added when `z_loss` is set.
            reduction: with `labels`, "mean", or "none" for each position's loss (B, T).
        """
        batch, length = input_ids.shape
        past = cache.length if cache is not None else 0
        if self.sequence_shard is not None:  # this rank's part of a longer row
            if cache is not None:
                raise ValueError("context parallelism is for training: no KV cache")
            past = self.sequence_shard.rank * length
        positions = torch.arange(past, past + length, device=input_ids.device)  # (T,)
        if position_ids is None:
            position_ids = positions.expand(batch, length)
        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        inputs = BlockInputs(rope=self.rope(position_ids) if self.rope is not None else None,
                             padding_mask=padding_mask)  # fmt: skip
        inputs.mask, inputs.global_mask = self._masks(positions, document_ids, padding_mask, cache)
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, inputs, layer_cache)
        x = self.norm(x)
        if labels is None:
            return self.head(x) if self.head is not None else x @ self.embed.weight.T  # (B,T,V)
        chunk, compiled = self.loss_chunk_tokens, self.loss_chunk_compiled
        z_loss = self.z_loss if self.training else 0.0  # evaluation: the cross-entropy alone
        if self.head is not None:
            loss, term = self.head(x, labels, chunk, compiled=compiled, reduction=reduction,
                                   z_loss=z_loss)  # fmt: skip
        else:
            loss, term = linear_cross_entropy_terms(x, self.embed.weight, None, labels, chunk,
                                                    compiled, reduction, z_loss)  # fmt: skip
        if term is not None:
            self.last_z_loss = term
        return loss

    def _masks(
        self,
        positions: Tensor,
        document_ids: Tensor | None,
        padding_mask: Tensor | None,
        cache: DecoderCache | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(mask of windowed blocks, mask of global blocks): None (SDPA's causal kernel) for
        plain causal attention, else a boolean mask, or with ALiBi its -inf-masked bias."""
        cfg = self.cfg
        plain = cache is None and document_ids is None and padding_mask is None
        plain = plain and self.alibi_slopes is None and self.sequence_shard is None
        key_padding, key_documents = padding_mask, document_ids
        key_positions = positions
        shard = self.sequence_shard
        if shard is not None:  # queries are this rank's part, keys the whole row
            key_positions = torch.arange(positions.numel() * shard.world, device=positions.device)
            key_padding = shard.gather(padding_mask, 1) if padding_mask is not None else None
            key_documents = shard.gather(document_ids, 1) if document_ids is not None else None
        if cache is not None:
            end = cache.length + positions.numel()
            if padding_mask is not None:
                cache.key_padding[:, cache.length : end] = padding_mask
            key_padding = cache.key_padding[:, :end]
            key_positions = torch.arange(end, device=positions.device)

        def build(window: int | None) -> Tensor | None:
            if plain and window is None:
                return None
            allowed = build_attention_mask(
                positions,
                key_positions,
                causal=True,
                window=window,
                global_tokens=cfg.global_tokens,
                query_documents=document_ids,
                key_documents=key_documents,
                key_padding=key_padding,
            )  # (B or 1, 1, T, S)
            if self.alibi_slopes is None:
                return allowed
            return apply_alibi(allowed, self.alibi_slopes, positions, key_positions)

        window = cfg.attention_window
        return build(window), build(None) if cfg.global_every and window is not None else None
