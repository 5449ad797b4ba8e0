"""BERT-style bidirectional encoder with a masked-LM head, chosen by config:

- BERT: word + learned position + token-type embeddings, LayerNorm after the sum, post-norm
  blocks with biases, GELU, an MLM head (dense + GELU + LayerNorm, then the tied vocabulary
  projection plus an output bias) (`model=tiny_encoder`, `bert_base`);
- a modern variant: RoPE instead of learned positions, pre-norm blocks with a final norm,
  RMSNorm, gated feed-forwards (any mix of the same switches builds).

`forward` returns logits for every position; `hidden` returns the final hidden states, so an
MLM loss can gather only the masked positions and call `mlm_logits` on those (most of the
vocabulary projection is then skipped). The optional [CLS] pooler is exposed as `pool(hidden)`;
MLM pretraining never calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import EncoderConfig
from pretrain.models.layers import (
    ACTIVATIONS,
    Block,
    BlockInputs,
    RotaryEmbedding,
    alibi_slopes,
    apply_alibi,
    build_attention_mask,
    build_norm,
    init_normal,
)
from pretrain.models.loss import IGNORE_INDEX, OutputHead, linear_cross_entropy_terms
from pretrain.models.moe import init_feed_forward


class MLMHead(nn.Module):
    """BERT's masked-LM head: optional transform (dense + activation + norm), then the vocabulary
    projection (the word embedding when tied, else `proj`) plus a per-token output bias."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        transform = cfg.mlm_head_transform
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias) if transform else None
        self.act = ACTIVATIONS[cfg.activation]  # the gate's activation for gated MLPs
        self.norm = build_norm(cfg) if transform else None
        self.proj = None if cfg.tie_embeddings else OutputHead(cfg.d_model, cfg.vocab_size, False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.bias else None

    def forward(self, x: Tensor, embedding: Tensor, labels: Tensor | None = None,
                chunk: int = 0, compiled: bool = False, reduction: str = "mean",
                z_loss: float = 0.0) -> Tensor | tuple[Tensor, Tensor | None]:  # fmt: skip
        """(..., C) hidden states -> (..., V) logits; `embedding` is the (V, C) word table.
        With (...) `labels`, (their mean fp32 cross-entropy, plus the z-loss when `z_loss` > 0,
        and that z-loss term or None) (`linear_cross_entropy_terms`, in chunks of `chunk`
        tokens when > 0), or with `reduction="none"` each position's loss and None."""
        if self.dense is not None and self.norm is not None:
            x = self.norm(self.act(self.dense(x)))
        if labels is None:
            logits = self.proj(x) if self.proj is not None else x @ embedding.T
            return logits + self.bias if self.bias is not None else logits
        if self.proj is None:
            return linear_cross_entropy_terms(x, embedding, self.bias, labels, chunk, compiled,
                                              reduction, z_loss)  # fmt: skip
        return self.proj(x, labels, chunk, bias=self.bias, compiled=compiled, reduction=reduction,
                         z_loss=z_loss)  # fmt: skip


class Encoder(nn.Module):
    """Token ids (B, T) -> masked-LM logits (B, T, V), attending in both directions."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.norm_position not in ("post", "pre"):
            raise ValueError(f"model.norm_position={cfg.norm_position!r} is not 'post' or 'pre'")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        )
        self.type_embed = (
            nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size > 0 else None
        )
        self.embed_norm = build_norm(cfg) if cfg.embedding_norm else None
        self.rope = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        slopes = alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        post_norm = cfg.norm_position == "post"
        self.blocks = nn.ModuleList(
            Block(cfg, causal=False, post_norm=post_norm, index=i) for i in range(cfg.n_layers)
        )
        self.drop = nn.Dropout(cfg.dropout)  # on the embeddings, in training only
        self.norm = None if post_norm else build_norm(cfg)  # final norm of pre-norm stacks
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias) if cfg.pooler else None
        self.head = MLMHead(cfg)
        self.loss_chunk_tokens = 0  # as `Decoder.loss_chunk_tokens`
        self.loss_chunk_compiled = False
        self.z_loss = 0.0  # as `Decoder.z_loss`
        self.last_z_loss: Tensor | None = None
        self.step_z_loss: Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute ALiBi's slopes (in no state dict) of a model built empty (`empty_model`)."""
        if self.alibi_slopes is not None:
            self.alibi_slopes.copy_(alibi_slopes(self.cfg.n_heads))

    def reset_parameters(self) -> None:
        """BERT's recipe: N(0, init_std) for every linear and embedding (no residual scaling),
        norms at 1, biases (the MLM output bias included) at 0."""
        init_normal(self, self.cfg.init_std)
        for block in self.blocks:  # MoE experts are stacked parameters, not Linear layers
            init_feed_forward(block.mlp, self.cfg.init_std, self.cfg.init_std)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def hidden(
        self,
        input_ids: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, C), before the MLM head; arguments as in `forward`."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)  # (T,)
        if position_ids is None:
            position_ids = positions.expand(batch, length)
        x = self.embed(input_ids)  # (B, T, C)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_embed(token_type_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        inputs = BlockInputs(rope=self.rope(position_ids) if self.rope is not None else None,
                             padding_mask=padding_mask)  # fmt: skip
        inputs.mask = self._mask(positions, document_ids, padding_mask, self.cfg.attention_window)
        if self.cfg.global_every:
            inputs.global_mask = self._mask(positions, document_ids, padding_mask, None)
        for block in self.blocks:
            x = block(x, inputs)
        return self.norm(x) if self.norm is not None else x

    def _mask(self, positions: Tensor, document_ids: Tensor | None, padding_mask: Tensor | None,
              window: int | None) -> Tensor | None:  # fmt: skip
        """None (full attention), a boolean (B, 1, T, T) mask, or with ALiBi its -inf-masked
        (B or 1, H, T, T) bias."""
        plain = padding_mask is None and document_ids is None and window is None
        if plain and self.alibi_slopes is None:
            return None
        allowed = build_attention_mask(
            positions,
            positions,
            causal=False,
            window=window,
            global_tokens=self.cfg.global_tokens,
            query_documents=document_ids,
            key_documents=document_ids,
            key_padding=padding_mask,
        )  # (B or 1, 1, T, T)
        if self.alibi_slopes is None:
            return allowed
        return apply_alibi(allowed, self.alibi_slopes, positions, positions)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """The MLM head on (..., C) hidden states (e.g. only the masked positions) -> (..., V)."""
        return self.head(hidden, self.embed.weight)

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooler: dense + tanh on the first position's (B, T, C) hidden state -> (B, C)."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (model.pooler=false)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(
        self,
        input_ids: Tensor,
        *,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        labels: Tensor | None = None,
        reduction: str = "mean",
    ) -> Tensor:
        """Masked-LM logits for every position, or with `labels` the masked-LM loss.

        Args:
            input_ids: (B, T) token ids.
            token_type_ids: (B, T) segment ids (BERT's sentence A/B); default all 0. Ignored
                when `model.type_vocab_size` is 0.
            position_ids: (B, T) positions (restarting at each document of a packed row);
                default 0..T-1.
            padding_mask: (B, T) True for real tokens; padding keys are never attended to,
                and MoE layers route only the real tokens.
            document_ids: (B, T) document of each token in a packed row; attention stays
                inside a document.
            labels: (B, T) original ids at the masked positions, -100 elsewhere: return the
                mean fp32 cross-entropy there. Outside a compiled forward, the head runs on the
                masked positions only (about 15%: what the loss reads; a compiled forward keeps
                every position, for static shapes), in chunks of `loss_chunk_tokens` tokens
                when set; in training plus the z-loss when `z_loss` is set.
            reduction: with `labels`, "mean", or "none" for each position's loss (B, T; 0
                where unmasked).

        Returns:
            (B, T, V) logits, or the loss.
        """
        hidden = self.hidden(
            input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            padding_mask=padding_mask,
            document_ids=document_ids,
        )
        if labels is None:
            return self.mlm_logits(hidden)
        z_loss = self.z_loss if self.training else 0.0  # evaluation: the cross-entropy alone
        chunk, compiled = self.loss_chunk_tokens, self.loss_chunk_compiled
        if torch.compiler.is_compiling():
            loss, term = self.head(hidden, self.embed.weight, labels, chunk, compiled, reduction,
                                   z_loss)  # fmt: skip
        else:
            masked = labels != IGNORE_INDEX
            loss, term = self.head(hidden[masked], self.embed.weight, labels[masked], chunk,
                                   compiled, reduction, z_loss)  # fmt: skip
            if reduction == "none":  # the masked positions' losses back in place
                return loss.new_zeros(labels.shape).masked_scatter(masked, loss)
        if term is not None:
            self.last_z_loss = term
        return loss
