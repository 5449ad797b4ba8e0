"""Incremental decoding with a KV cache for decoders and encoder-decoders.

Greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling; stop tokens; a batch
of prompts of different lengths (decoder prompts are left-padded, so every row's next token is
at the same column). `use_cache=False` recomputes the whole sequence at every step: slower,
and the reference that the cached path must reproduce token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    stop_tokens: Sequence[int] = field(default_factory=tuple)  # a row ends after emitting one
    pad_id: int = 0
    seed: int | None = None


def choose_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) token ids."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    if cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids, mask


class _Tracker:
    """Collects each row's new tokens and notices stop tokens."""

    def __init__(self, batch: int, cfg: SamplingConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(list(cfg.stop_tokens), dtype=torch.long, device=device)

    def add(self, next_tokens: Tensor) -> Tensor:
        """Record a step; finished rows get `pad_id`. Returns the tokens to feed back."""
        next_tokens = next_tokens.masked_fill(self.done, self.cfg.pad_id)
        for row, token in enumerate(next_tokens.tolist()):
            if not self.done[row]:
                self.tokens[row].append(token)
        if self.stop.numel():
            self.done |= torch.isin(next_tokens, self.stop)
        return next_tokens

    @property
    def finished(self) -> bool:
        return bool(self.done.all())


@torch.no_grad()
def generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, use_cache: bool = True
) -> list[list[int]]:
    """Continue each prompt with a decoder; returns the new tokens of each row (a stop token
    included when one ended the row)."""
    from pretrain.models.decoder import DecoderCache

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, cfg.pad_id, device)  # (B, P)
    batch, width = ids.shape
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # real tokens count from 0
    tracker = _Tracker(batch, cfg, device)
    generator = _generator(cfg, device)
    cache = DecoderCache(model, batch, width + cfg.max_new_tokens) if use_cache else None
    logits = model(ids, position_ids=positions, padding_mask=mask, cache=cache)[:, -1]
    for step in range(cfg.max_new_tokens):
        token = tracker.add(choose_next(logits, cfg, generator))  # (B,)
        if tracker.finished or step == cfg.max_new_tokens - 1:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token[:, None], dtype=torch.bool)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if cache is not None:
            logits = model(ids[:, -1:], position_ids=positions[:, -1:],
                           padding_mask=mask[:, -1:], cache=cache)[:, -1]  # fmt: skip
        else:
            logits = model(ids, position_ids=positions, padding_mask=mask)[:, -1]
    return tracker.tokens


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    inputs: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    use_cache: bool = True,
    start_id: int = 0,
) -> list[list[int]]:
    """Generate target sequences with an encoder-decoder; the decoder starts from `start_id`
    (T5: the pad id). Inputs are right-padded; the encoder runs once."""
    from pretrain.models.encoder_decoder import EncoderDecoderCache

    device = next(model.parameters()).device
    width = max(len(sequence) for sequence in inputs)
    ids = torch.full((len(inputs), width), cfg.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(inputs), width), dtype=torch.bool, device=device)
    for row, sequence in enumerate(inputs):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = True
    memory = model.encode(ids, padding_mask=mask)  # (B, S, C)
    batch = ids.shape[0]
    decoded = torch.full((batch, 1), start_id, dtype=torch.long, device=device)
    tracker = _Tracker(batch, cfg, device)
    generator = _generator(cfg, device)
    cache = EncoderDecoderCache(model, batch, cfg.max_new_tokens + 1) if use_cache else None
    logits = model.decode(decoded, memory, memory_padding_mask=mask, cache=cache)[:, -1]
    for step in range(cfg.max_new_tokens):
        token = tracker.add(choose_next(logits, cfg, generator))
        if tracker.finished or step == cfg.max_new_tokens - 1:
            break
        decoded = torch.cat([decoded, token[:, None]], dim=1)
        step_input = decoded[:, -1:] if cache is not None else decoded
        logits = model.decode(step_input, memory, memory_padding_mask=mask, cache=cache)[:, -1]
    return tracker.tokens
