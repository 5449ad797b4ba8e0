"""Array-level building blocks of the objectives in `pretrain/objectives.py`.

Pure numpy functions of token arrays and a `numpy.random.Generator`; no configs, no objects.
Every random choice goes through the generator passed in, so a sample's result is a function of
its tokens and its seed alone.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # label of positions without a loss (torch's cross-entropy default)


# --------------------------------------------------------------------------------------------
# packed documents


def document_starts(document_ids: np.ndarray) -> np.ndarray:
    """(..., L) bool: True at the first token of each run of equal document ids (and at 0)."""
    starts = np.ones(document_ids.shape, dtype=bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return starts


def document_positions(document_ids: np.ndarray) -> np.ndarray:
    """(..., L) int64 positions that restart at 0 at each document of a packed row."""
    index = np.broadcast_to(np.arange(document_ids.shape[-1], dtype=np.int64), document_ids.shape)
    start = np.maximum.accumulate(np.where(document_starts(document_ids), index, 0), axis=-1)
    return index - start


# Packed rows hold few document boundaries (a document is usually longer than a row), so the
# loader's hot path finds them with one vectorised search and then fixes up a slice per
# boundary; a running cumsum / maximum over every token costs several times more. Above this
# many boundaries per row the dense scans win again.
SPARSE_BOUNDARIES_PER_ROW = 2


def ids_after_ends(tokens: np.ndarray, end_id: int) -> np.ndarray:
    """(B, N) int64 row-local document ids of (B, N) packed rows: the number of `end_id`
    tokens strictly before each position (0 at each row's start)."""
    rows, width = tokens.shape
    is_end = tokens[:, :-1] == end_id
    ends = np.flatnonzero(is_end)
    ids = np.zeros((rows, width), dtype=np.int64)
    if ends.size > SPARSE_BOUNDARIES_PER_ROW * rows:
        np.cumsum(is_end, axis=1, out=ids[:, 1:])
        return ids
    for flat in ends.tolist():
        row, column = divmod(flat, width - 1)
        ids[row, column + 1 :] += 1
    return ids


def row_positions(document_ids: np.ndarray) -> np.ndarray:
    """(..., L) int64 positions restarting at 0 at each document, like `document_positions`,
    for row-local ids (non-decreasing from 0 along each row), with the sparse fix-up."""
    shape = document_ids.shape
    width = shape[-1]
    ids = document_ids.reshape(-1, width)
    changes = np.flatnonzero(ids[:, 1:] != ids[:, :-1])
    if changes.size > SPARSE_BOUNDARIES_PER_ROW * ids.shape[0]:
        return document_positions(document_ids)
    positions = np.tile(np.arange(width, dtype=np.int64), (ids.shape[0], 1))
    for flat in changes.tolist():
        row, column = divmod(flat, width - 1)
        positions[row, column + 1 :] -= positions[row, column + 1]
    return positions.reshape(shape)


def renumber_documents(document_ids: np.ndarray) -> np.ndarray:
    """(..., L) int64 row-local document ids 0, 1, 2, ... (one per run of equal input ids)."""
    return np.cumsum(document_starts(document_ids), axis=-1, dtype=np.int64) - 1


# --------------------------------------------------------------------------------------------
# T5 span noise


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of one `length`-token sequence, as T5 counts them.

    noise = round(length * density), kept in [1, length - 1] so both kinds of token exist;
    spans = max(1, round(noise / mean_span_length)), at most the noise and the non-noise
    counts (every span of either kind holds at least one token). Sequences under 2 tokens get
    no noise. For the windows `span_corruption_lengths` sizes, the clamps never bind (the
    objectives check this), so the counts match its arithmetic exactly.
    """
    if length < 2:
        return 0, 0
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(1, round(noise / mean_span_length))
    return noise, min(spans, noise, length - noise)


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """(n_segments,) int64 lengths of a uniformly random split of `n_items` into non-empty runs.

    Every composition of `n_items` into `n_segments` positive parts is equally likely: the
    `n_segments - 1` cut points are a uniform subset of the `n_items - 1` gaps.
    """
    if not 1 <= n_segments <= n_items:
        raise ValueError(f"cannot split {n_items} items into {n_segments} non-empty segments")
    cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n_items]])).astype(np.int64)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """(length,) bool, True on noise: T5's `random_spans_noise_mask`, re-derived.

    The noise and non-noise token counts (`noise_counts`) are each split at random into the
    same number of non-empty spans, which alternate starting with a non-noise span (so the
    sequence ends with a noise span).
    """
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    mask = np.zeros(length, dtype=bool)
    if spans == 0:
        return mask
    noise_lengths = random_segmentation(noise, spans, rng)  # (spans,)
    clean_lengths = random_segmentation(length - noise, spans, rng)  # (spans,)
    interleaved = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)  # (2 * spans,)
    is_noise = np.tile([False, True], spans)  # (2 * spans,)
    return np.repeat(is_noise, interleaved)


def corrupt_spans(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """T5 inputs and targets of `tokens` (N,) under `noise_mask` (N,).

    Input: the non-noise tokens, each noise span replaced by the next sentinel, then EOS.
    Target: each noise span's sentinel followed by the span's tokens, then EOS. Sentinel k is
    `sentinels[k]` for the k-th span (the caller checks there are enough).

    Returns:
        (inputs (N - noise + spans + 1,), targets (noise + spans + 1,)), int64.
    """
    span_start = noise_mask.copy()
    span_start[1:] &= ~noise_mask[:-1]
    span_index = np.cumsum(span_start) - 1  # (N,) index of the span a noise token belongs to
    n_spans = int(span_start.sum())
    if n_spans > len(sentinels):
        raise ValueError(f"{n_spans} noise spans but only {len(sentinels)} sentinels")
    span_sentinel = sentinels[np.maximum(span_index, 0)]  # (N,)

    keep = ~noise_mask | span_start  # a span's first token carries its sentinel
    inputs = np.where(span_start, span_sentinel, tokens)[keep]
    inputs = np.append(inputs, eos)

    noise_tokens = tokens[noise_mask]  # (noise,)
    # every span start pushes the span's tokens one slot further for its sentinel
    slot = np.arange(noise_tokens.shape[0]) + np.cumsum(span_start[noise_mask])
    targets = np.empty(noise_tokens.shape[0] + n_spans + 1, dtype=np.int64)
    targets[slot] = noise_tokens
    starts = span_start[noise_mask]
    targets[slot[starts] - 1] = span_sentinel[noise_mask][starts]
    targets[-1] = eos
    return inputs.astype(np.int64), targets


# --------------------------------------------------------------------------------------------
# masked LM selection


def choose_positions(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(L,) bool: exactly `count` of the True positions of `candidates` (L,), uniformly."""
    chosen = np.zeros(candidates.shape[0], dtype=bool)
    chosen[rng.choice(np.flatnonzero(candidates), size=count, replace=False)] = True
    return chosen


def word_ids(maskable: np.ndarray, starts_word: np.ndarray, document_ids: np.ndarray) -> np.ndarray:
    """(L,) int64 word index of each maskable token, -1 for the others.

    A word starts at a token whose piece starts a word, after an unmaskable token (EOS or any
    special), at a document boundary, and at the start of the row; it runs up to the next start.
    """
    start = starts_word | document_starts(document_ids)
    start[1:] |= ~maskable[:-1]
    start &= maskable
    ids = np.cumsum(start) - 1
    return np.where(maskable, ids, -1).astype(np.int64)


def choose_words(words: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(L,) bool: whole words of `words` (L,) (ids from `word_ids`) covering about `count` tokens.

    Words are taken in a random order while they fit; the word that crosses `count` is taken
    when that lands closer to `count` than stopping short (ties take it), so the masked share
    is unbiased to within half a word, and long words are as likely to be taken as short ones.
    """
    n_words = int(words.max()) + 1 if words.size else 0
    if n_words == 0 or count == 0:
        return np.zeros(words.shape[0], dtype=bool)
    lengths = np.bincount(words[words >= 0], minlength=n_words)  # (W,)
    order = rng.permutation(n_words)
    covered = np.cumsum(lengths[order])  # (W,)
    k = int(np.searchsorted(covered, count, side="left"))  # first prefix reaching count
    if k < n_words:
        short = covered[k - 1] if k > 0 else 0
        k += int(covered[k] - count <= count - short)
    taken = np.zeros(n_words + 1, dtype=bool)  # the extra slot is the -1 of unmaskable tokens
    taken[order[:k]] = True
    return taken[words]
