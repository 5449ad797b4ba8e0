"""Training objectives as transforms over packed shard tokens.

Only the length arithmetic lives here so far; `kiln plan` needs it to size encoder-decoder runs.
"""

from __future__ import annotations

from pretrain.config import KilnConfig, SpanCorruptionConfig, UL2Config


def span_corruption_lengths(
    input_len: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """Raw tokens per example and the target length, so corrupted inputs fill `input_len`.

    Noise spans collapse to one sentinel each in the input; the target holds every noise span
    behind its sentinel. Both end with EOS. We search for the largest raw length whose input
    fits (T5's own procedure, re-derived here).

    Returns:
        (raw_tokens, target_len)
    """

    def lengths(raw: int) -> tuple[int, int]:
        noise = round(raw * noise_density)
        spans = max(1, round(noise / mean_span_length))
        return raw - noise + spans + 1, noise + spans + 1

    raw = input_len - 1
    while lengths(raw + 1)[0] <= input_len:
        raw += 1
    return raw, lengths(raw)[1]


def encoder_decoder_lengths(cfg: KilnConfig) -> tuple[int, int]:
    """(encoder length, decoder length) of one training example for the configured objective."""
    objective, seq_len = cfg.objective, cfg.data.seq_len
    if isinstance(objective, SpanCorruptionConfig):
        return seq_len, span_corruption_lengths(
            seq_len, objective.noise_density, objective.mean_span_length
        )[1]
    if isinstance(objective, UL2Config):
        # The X-denoiser has the longest targets; size buffers (and plans) for the worst case.
        target = max(
            span_corruption_lengths(
                seq_len, objective.r_noise_density, objective.r_mean_span_length
            )[1],
            span_corruption_lengths(
                seq_len, objective.x_noise_density, objective.x_mean_span_length
            )[1],
            seq_len // 4 + 1 if objective.s_weight > 0 else 0,
        )
        return seq_len, target
    raise ValueError(f"objective {objective.kind} does not train encoder-decoders")
