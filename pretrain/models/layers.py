"""Building blocks shared by the three families: norms, feed-forwards, rotary embeddings,
attention through `scaled_dot_product_attention`, attention masks and the transformer block.

Plain PyTorch, no distributed imports. Shapes: B batch, T query length, S key length, H query
heads, K key/value heads, D head dim, C model width (`d_model`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig, RopeScalingConfig

# --------------------------------------------------------------------------------------------
# norms and feed-forward


def build_norm(cfg: ModelConfig, width: int | None = None) -> nn.Module:
    """RMSNorm (LLaMA, T5) or LayerNorm (GPT-2, BERT; with a bias when `cfg.bias`) over the
    last `width` features (default `d_model`; a head's `head_dim` for QK-norm)."""
    width = width or cfg.d_model
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=cfg.norm_eps)
    return nn.LayerNorm(width, eps=cfg.norm_eps, bias=cfg.bias)


ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu}


class FeedForward(nn.Module):
    """Dense MLP: `down(act(gate(x)) * up(x))` when gated (SwiGLU, GeGLU), else `down(act(up(x)))`.

    GELU is the exact (erf) form everywhere; exports declare it so transformers matches.
    """

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.act = ACTIVATIONS[cfg.activation]
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias) if cfg.gated else None
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.down(self.act(self.up(x)))


# --------------------------------------------------------------------------------------------
# rotary position embeddings


def rope_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """(inverse frequencies (D/2,), cos/sin scale) of `cfg`'s RoPE with its `rope_scaling`.

    The same formulas as transformers' `modeling_rope_utils` (default, linear, YaRN), so an
    exported model computes the same angles; "ntk" is the static NTK-aware base
    `rope_theta * factor ** (D / (D - 2))` (transformers only has the dynamic form).
    """
    dim = cfg.resolved_head_dim
    scaling = cfg.rope_scaling
    theta = cfg.rope_theta
    if scaling.kind == "ntk":
        theta *= scaling.factor ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # (D/2,)
    inv_freq = 1.0 / theta**exponents
    if scaling.kind in ("none", "ntk"):
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.kind != "yarn":
        raise ValueError(f"model.rope_scaling.kind={scaling.kind!r} is not none|linear|ntk|yarn")
    return yarn_frequencies(dim, theta, cfg.max_seq_len, scaling)


def yarn_frequencies(
    dim: int, theta: float, max_seq_len: int, scaling: RopeScalingConfig
) -> tuple[Tensor, float]:
    """YaRN (Peng et al. 2023): dims that turn fewer than `beta_slow` times over the original
    context are interpolated (divided by `factor`), dims turning more than `beta_fast` times
    keep their frequency, a linear ramp in between; cos/sin are scaled by the attention factor
    (0.1 ln(factor) + 1 unless given), which sharpens attention at long range."""
    factor = scaling.factor
    original = scaling.original_max_seq_len or max(1, round(max_seq_len / factor))
    attention = scaling.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def dim_of(rotations: float) -> float:  # the dim that turns `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base_freq = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)  # (D/2,)
    extrapolated, interpolated = 1.0 / base_freq, 1.0 / (factor * base_freq)
    keep = 1 - ramp  # 1: the original frequency (fast dims), 0: interpolated (slow dims)
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout (the first and second halves of a head form the pairs),
    the layout of LLaMA checkpoints in transformers, so exported weights need no permutation.

    `rope_scaling` (see `RopeScalingConfig` and `rope_frequencies`): "linear" (position
    interpolation), "ntk" (NTK-aware base), "yarn" (ramped interpolation and a cos/sin scale).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq, self.attention_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies (in no state dict) of a model built empty (`empty_model`)."""
        self.inv_freq.copy_(rope_frequencies(self.cfg)[0])

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (B, T, D) in float32, for integer positions (B, T)."""
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        if self.attention_scale == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.attention_scale, angles.sin() * self.attention_scale


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) queries or keys by (B, T, D) angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# masks


def index_in_document(positions: Tensor, documents: Tensor | None,
                      padding: Tensor | None = None) -> Tensor:  # fmt: skip
    """(B or 1, S) index of each token within its document: its row position, counted among
    real tokens when `padding` (B, S) is given, restarting where `documents` (B, S) changes."""
    index = positions if positions.dim() == 2 else positions[None]  # (B or 1, S)
    if padding is not None:
        index = padding.long().cumsum(-1) - 1
    if documents is None:
        return index
    index = index.expand(documents.shape)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    low = torch.full_like(index, torch.iinfo(index.dtype).min)
    first = torch.where(starts, index, low).cummax(dim=-1).values  # index of the doc's start
    return index - first


def build_attention_mask(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    window: int | None = None,
    global_tokens: int = 0,
    query_documents: Tensor | None = None,
    key_documents: Tensor | None = None,
    key_padding: Tensor | None = None,
) -> Tensor:
    """A boolean (B, 1, T, S) mask, True where a query may attend to a key.

    Args:
        query_positions: (B, T) or (T,) absolute index of each query in the sequence.
        key_positions: (B, S) or (S,) absolute index of each key.
        causal: keys after the query are hidden.
        window: only keys less than `window` positions away are visible: the last `window`
            keys up to the query when `causal`, else `window - 1` on each side.
        global_tokens: with `window`, the first `global_tokens` keys of every document stay
            visible to every query of that document (attention sinks); without `causal` these
            tokens' own queries also see the whole document (Longformer's global attention).
        query_documents, key_documents: (B, T), (B, S) document ids of packed sequences;
            attention never crosses a document boundary.
        key_padding: (B, S) True for real tokens, False for padding.

    A query always sees itself (when its key is present), so no row is empty: SDPA returns
    NaN for a row with no visible key (a padding query in a left-padded batch).
    """
    q = query_positions[..., :, None]  # (B, T, 1)
    k = key_positions[..., None, :]  # (B, 1, S)
    allowed = torch.ones(torch.broadcast_shapes(q.shape, k.shape), dtype=torch.bool,
                         device=q.device)  # fmt: skip
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        near = (q - k < window) if causal else ((q - k).abs() < window)
        if global_tokens:
            key_index = index_in_document(key_positions, key_documents, key_padding)
            near = near | (key_index[:, None, :] < global_tokens)
            if not causal:
                query_index = index_in_document(query_positions, query_documents)
                near = near | (query_index[:, :, None] < global_tokens)
        allowed = allowed & near
    if query_documents is not None and key_documents is not None:
        allowed = allowed & (query_documents[:, :, None] == key_documents[:, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, :]
    allowed = allowed | (k == q)
    if allowed.dim() == 2:
        allowed = allowed[None]
    return allowed[:, None]  # (B, 1, T, S)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n),
    ... for n a power of two; otherwise those of the power of two below, then every other slope
    of the next power of two (as BLOOM and MPT compute them)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    slopes += [2 ** (-4 * (2 * i + 1) / closest) for i in range(n_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


def apply_alibi(allowed: Tensor, slopes: Tensor, query_positions: Tensor,
                key_positions: Tensor) -> Tensor:  # fmt: skip
    """The additive (B or 1, H, T, S) float bias `-slope * |query - key|`, -inf where the
    boolean (B or 1, 1, T, S) mask `allowed` hides a key (what SDPA takes as `attn_mask`)."""
    q = query_positions[..., :, None].to(torch.float32)  # (T, 1) or (B, T, 1)
    k = key_positions[..., None, :].to(torch.float32)  # (1, S) or (B, 1, S)
    distance = (q - k).abs()
    distance = distance[None] if distance.dim() == 2 else distance  # (B or 1, T, S)
    bias = -slopes.to(distance.device)[None, :, None, None] * distance[:, None]  # (B|1,H,T,S)
    return bias.masked_fill(~allowed, float("-inf"))


def global_layer(cfg: ModelConfig, index: int) -> bool:
    """Whether block `index` attends to the whole sequence when the others use the window:
    the last of every `model.global_every` blocks."""
    return cfg.global_every > 0 and (index + 1) % cfg.global_every == 0


# --------------------------------------------------------------------------------------------
# attention


@dataclass
class SequenceShard:
    """This rank's contiguous part of every sequence under context parallelism: rank r of W
    holds tokens [r * T, (r + 1) * T) of a W * T-token row. Set on the model and its attention
    layers by `pretrain.engine.context_parallel`; the models only call `gather`."""

    rank: int
    world: int
    gather: Callable[[Tensor, int], Tensor]  # every rank's part, concatenated along a dim


class LayerCache:
    """Keys and values of one attention layer for incremental decoding.

    Self-attention: preallocated (B, K, capacity, D) buffers filled left to right, so memory
    is `2 * B * K * capacity * D * itemsize` per layer: linear in the length decoded.
    Cross-attention: the encoder's keys and values, computed once on the first step.
    """

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def allocate(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, K, T, D) new keys and values; return all (B, K, length, D) so far."""
        assert self.keys is not None and self.values is not None, "allocate() first"
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache capacity {self.keys.shape[2]} exceeded ({end} tokens)")
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, through `scaled_dot_product_attention`.

    Args:
        cfg: widths, heads, bias.
        causal: a self-attention that hides later keys (uses SDPA's causal kernel when no
            other mask is given).
        scale: the score scale; None is 1/sqrt(D). T5 uses 1.0 (its init absorbs the scale).

    With `model.qk_norm`, each head's queries and keys are normalised over their D features
    (one gain of D shared by the heads, as Qwen3's and Gemma 3's) before RoPE; cached keys are
    stored normalised.
    """

    def __init__(self, cfg: ModelConfig, *, causal: bool, scale: float | None = None) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.causal = causal
        self.scale = scale
        self.dropout = cfg.dropout  # on attention probabilities, in training only
        inner, kv_inner = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, kv_inner, bias=cfg.bias)
        self.o = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.q_norm = build_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, self.head_dim) if cfg.qk_norm else None
        self.sequence_shard: SequenceShard | None = None  # context parallelism (self-attention)

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Attend from `x` (B, T, C) to itself, or to `context` (B, S, C) for cross-attention.

        `mask` is a boolean (B, 1, T, S) "may attend" mask or a float additive bias (T5's
        relative positions, already combined with any mask); None means full attention, or
        causal attention for a causal layer without a cache.
        """
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if context is not None and cache is not None and cache.keys is not None:
            k, v = cache.keys, cache.values  # cross-attention: encoder keys, computed once
        else:
            source = x if context is None else context
            k = self.k(source).view(batch, -1, self.n_kv_heads, self.head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = k.transpose(1, 2)  # (B, K, S, D)
            v = self.v(source).view(batch, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if rope is not None:
                k = apply_rotary(k, *rope)
            if self.sequence_shard is not None:  # every rank's keys: (B, K, W * T, D)
                k, v = self.sequence_shard.gather(k, 2), self.sequence_shard.gather(v, 2)
            if cache is not None and context is not None:
                cache.keys, cache.values, cache.length = k, v, k.shape[2]
            elif cache is not None:
                k, v = cache.append(k, v)  # (B, K, S, D): everything so far
        if rope is not None:
            q = apply_rotary(q, *rope)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal and mask is None and cache is None,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


# --------------------------------------------------------------------------------------------
# the block


@dataclass
class BlockInputs:
    """What every block of a stack shares in one forward pass (built once by the model)."""

    rope: tuple[Tensor, Tensor] | None = None
    mask: Tensor | None = None  # self-attention mask or additive bias
    global_mask: Tensor | None = None  # the same without the window, for global blocks
    context: Tensor | None = None  # encoder output, for cross-attention
    context_mask: Tensor | None = None  # cross-attention mask or bias
    padding_mask: Tensor | None = None  # (B, T) True for real tokens: all MoE layers route


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, feed-forward.

    Pre-norm (`x + f(norm(x))`, GPT-2, LLaMA, T5) or post-norm (`norm(x + f(x))`, BERT).
    `model.dropout` applies to each sublayer's output before the residual sum (and to
    attention probabilities), in training only.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        causal: bool,
        cross_attention: bool = False,
        post_norm: bool = False,
        scale: float | None = None,
        index: int = 0,
    ) -> None:
        from pretrain.models.moe import MoEFeedForward, build_feed_forward  # moe imports this

        super().__init__()
        self.post_norm = post_norm
        self.global_attention = global_layer(cfg, index)  # no window in this block
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, causal=causal, scale=scale)
        self.cross_norm = build_norm(cfg) if cross_attention else None
        self.cross_attn = Attention(cfg, causal=False, scale=scale) if cross_attention else None
        self.mlp_norm = build_norm(cfg)
        self.mlp = build_feed_forward(cfg, index)  # dense, or MoE on every k-th block
        self.routed = isinstance(self.mlp, MoEFeedForward)  # takes the padding mask
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        inputs: BlockInputs,
        cache: LayerCache | None = None,
        cross_cache: LayerCache | None = None,
    ) -> Tensor:
        drop = self.drop
        mask = inputs.global_mask if self.global_attention else inputs.mask
        if self.post_norm:
            attended = self.attn(x, rope=inputs.rope, mask=mask, cache=cache)
            x = self.attn_norm(x + drop(attended))
            return self.mlp_norm(x + drop(self.feed_forward(x, inputs)))
        x = x + drop(self.attn(self.attn_norm(x), rope=inputs.rope, mask=mask, cache=cache))
        if self.cross_attn is not None and self.cross_norm is not None:
            x = x + drop(
                self.cross_attn(
                    self.cross_norm(x),
                    context=inputs.context,
                    mask=inputs.context_mask,
                    cache=cross_cache,
                )
            )
        return x + drop(self.feed_forward(self.mlp_norm(x), inputs))

    def feed_forward(self, x: Tensor, inputs: BlockInputs) -> Tensor:
        """The MLP; an MoE layer routes only the real tokens of `inputs.padding_mask`."""
        if self.routed and inputs.padding_mask is not None:
            return self.mlp(x, inputs.padding_mask)
        return self.mlp(x)


def init_normal(module: nn.Module, std: float) -> None:
    """Normal(0, std) weights and zero biases for Linear and Embedding; norms to 1 and 0."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)):
            if sub.weight is not None:
                nn.init.ones_(sub.weight)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


def residual_std(std: float, n_layers: int) -> float:
    """GPT-2's scaled init of the projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layers)
