"""Training objectives as transforms over packed shard tokens.

The data loader reads, for every global sample, a window of `objective.raw_length(seq_len)`
packed tokens (documents separated by the EOS it inserts, with per-token document ids) and calls
`objective(tokens, document_ids, rng)` with a generator seeded from (data seed, sample index).
The objective returns a dict of fixed-shape numpy arrays (`output_shapes`, `output_dtypes`),
which the loader stacks into batches. Every random choice goes through `rng`, so a sample does
not depend on ranks or workers. `seq_len` is not fixed when an objective is built (it may grow
during a sequence-length warm-up); each call infers it from the window's length.

Objectives (`build_objective` picks one from the config):

- `CausalLM` (decoders): next-token prediction.
- `MaskedLM` (encoders): BERT's 80/10/10 masking, optionally of whole words.
- `SpanCorruption` (encoder-decoders): T5's sentinel span corruption.
- `UL2` (encoder-decoders): a per-sample mixture of R (span), S (`PrefixLM`) and X (span)
  denoisers.

The array-level pieces (noise masks, span corruption, word selection) live in
`pretrain/noising.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config import (
    CausalLMConfig,
    KilnConfig,
    MaskedLMConfig,
    ObjectiveConfig,
    SpanCorruptionConfig,
    UL2Config,
)
from pretrain.noising import (
    IGNORE_INDEX,
    choose_positions,
    choose_words,
    corrupt_spans,
    document_positions,
    noise_counts,
    random_spans_noise_mask,
    renumber_documents,
    row_positions,
    word_ids,
)

# --------------------------------------------------------------------------------------------
# lengths


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


_cached_span_lengths = lru_cache(maxsize=4096)(span_corruption_lengths)


def prefix_lm_lengths(seq_len: int) -> tuple[int, int]:
    """(raw tokens, target length) of UL2's S-denoiser at encoder length `seq_len`.

    The prefix fills the input (`seq_len - 1` tokens, then EOS) and the suffix is 1 to
    `seq_len // 4` tokens (then EOS).
    """
    return seq_len - 1 + seq_len // 4, seq_len // 4 + 1


def ul2_lengths(objective: UL2Config, seq_len: int) -> dict[str, tuple[int, int]]:
    """{"R" | "S" | "X": (raw tokens, target length)} of the UL2 denoisers with weight > 0."""
    lengths = {
        "R": _cached_span_lengths(seq_len, objective.r_noise_density, objective.r_mean_span_length),
        "S": prefix_lm_lengths(seq_len),
        "X": _cached_span_lengths(seq_len, objective.x_noise_density, objective.x_mean_span_length),
    }
    weights = {"R": objective.r_weight, "S": objective.s_weight, "X": objective.x_weight}
    return {name: value for name, value in lengths.items() if weights[name] > 0}


def encoder_decoder_lengths(cfg: KilnConfig) -> tuple[int, int]:
    """(encoder length, decoder length) of one training example for the configured objective."""
    objective, seq_len = cfg.objective, cfg.data.seq_len
    if isinstance(objective, SpanCorruptionConfig):
        return seq_len, span_corruption_lengths(
            seq_len, objective.noise_density, objective.mean_span_length
        )[1]
    if isinstance(objective, UL2Config):
        # Every sample is padded to the longest target of the enabled denoisers (usually X's).
        return seq_len, max(target for _, target in ul2_lengths(objective, seq_len).values())
    raise ValueError(f"objective {objective.kind} does not train encoder-decoders")


# --------------------------------------------------------------------------------------------
# special tokens


@dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's special token ids (the same in every tokenizer kiln trains).

    Attributes:
        sentinels: `<extra_id_0>`, `<extra_id_1>`, ...: sentinel k marks the k-th noise span.
    """

    pad: int = 0
    unk: int = 1
    bos: int = 2
    eos: int = 3
    mask: int = 4
    sentinels: tuple[int, ...] = ()

    @classmethod
    def from_manifest(cls, tokenizer: Any) -> SpecialIds:
        """From the manifest's tokenizer record: a `TokenizerRecord` / `TokenizerInfo`, its
        dict form (`{"special_ids": {...}, "sentinel_ids": [...]}`), or a whole manifest
        (object or dict) holding one under `tokenizer`."""
        if isinstance(tokenizer, Mapping):
            record = tokenizer.get("tokenizer", tokenizer)
            special, sentinels = record["special_ids"], record["sentinel_ids"]
        else:
            record = getattr(tokenizer, "tokenizer", tokenizer)
            special, sentinels = record.special_ids, record.sentinel_ids
        missing = [name for name in ("pad", "unk", "bos", "eos", "mask") if name not in special]
        if missing:
            raise ValueError(f"tokenizer special_ids lack {', '.join(missing)}: {dict(special)}")
        return cls(
            **{name: int(special[name]) for name in ("pad", "unk", "bos", "eos", "mask")},
            sentinels=tuple(int(token) for token in sentinels),
        )

    @property
    def all_ids(self) -> tuple[int, ...]:
        """Every special id, sentinels included."""
        return (self.pad, self.unk, self.bos, self.eos, self.mask, *self.sentinels)

    def table(self, vocab_size: int) -> np.ndarray:
        """(vocab_size,) bool, True at special ids."""
        ids = [token for token in self.all_ids if token >= 0]
        if max(ids) >= vocab_size:
            raise ValueError(f"special id {max(ids)} is outside the vocabulary ({vocab_size})")
        table = np.zeros(vocab_size, dtype=bool)
        table[ids] = True
        return table


def word_starts_from_sentencepiece(model_path: str | Path) -> np.ndarray:
    """(vocab,) bool: True for pieces that start a word, for whole-word masking.

    A piece starts a word when it begins with "▁" (SentencePiece's space) or with whitespace
    (newlines, tabs), or when it is not a normal piece (control, unknown, user-defined such as
    `<mask>` and the sentinels, unused, byte-fallback). Other pieces continue the word before.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    normal = model_pb2.ModelProto.SentencePiece.NORMAL
    starts = np.zeros(processor.get_piece_size(), dtype=bool)
    for token in range(starts.shape[0]):
        piece = processor.id_to_piece(token)
        starts[token] = (
            proto.pieces[token].type != normal
            or processor.is_control(token)
            or processor.is_unknown(token)
            or processor.is_byte(token)
            or piece[:1] == "▁"
            or piece[:1].isspace()
        )
    return starts


# --------------------------------------------------------------------------------------------
# the protocol


def _as_ids(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"an objective transforms one (raw_length,) window, got {tokens.shape}")
    return tokens.astype(np.int64, copy=True)


class Objective(abc.ABC):
    """A training objective: raw window -> fixed-shape arrays for the model and the loss.

    Subclasses implement `_raw_length`, `output_shapes`, `_transform` and, where needed,
    `_check` (which rejects a `seq_len` the objective cannot serve with a ValueError).
    """

    dtypes: dict[str, Any] = {}  # key -> numpy dtype of each output
    uses_rng: bool = True  # False: the loader may pass rng=None (and call `batch` if defined)

    def __init__(self, special: SpecialIds) -> None:
        self.special = special
        self._checked: set[int] = set()
        self._seq_lens: dict[int, int] = {}

    def raw_length(self, seq_len: int) -> int:
        """Tokens the loader reads per sample for model length `seq_len`."""
        self.check(seq_len)
        return self._raw_length(seq_len)

    @abc.abstractmethod
    def _raw_length(self, seq_len: int) -> int: ...

    @abc.abstractmethod
    def output_shapes(self, seq_len: int) -> dict[str, tuple[int, ...]]:
        """The fixed shape of every array `__call__` returns (the loader batches them)."""

    def output_dtypes(self) -> dict[str, Any]:
        """The numpy dtype of every array `__call__` returns."""
        return dict(self.dtypes)

    def check(self, seq_len: int) -> None:
        """Raise ValueError if this objective cannot build samples of model length `seq_len`."""
        if seq_len not in self._checked:
            if seq_len < 1:
                raise ValueError(f"data.seq_len={seq_len} must be > 0")
            self._check(seq_len)
            self._checked.add(seq_len)

    def _check(self, seq_len: int) -> None:
        return None

    def seq_len_for(self, raw_length: int) -> int:
        """The model length whose windows hold `raw_length` tokens (inverse of `raw_length`)."""
        if raw_length not in self._seq_lens:
            # raw lengths grow strictly with seq_len, and raw_length(s) >= s - 1
            low, high = 1, raw_length + 1
            while low < high:
                middle = (low + high) // 2
                if self._raw_length(middle) < raw_length:
                    low = middle + 1
                else:
                    high = middle
            if self._raw_length(low) != raw_length:
                raise ValueError(
                    f"a window of {raw_length} tokens is not raw_length(seq_len) of "
                    f"{type(self).__name__} for any seq_len"
                )
            self._seq_lens[raw_length] = low
        return self._seq_lens[raw_length]

    def __call__(
        self, tokens: np.ndarray, document_ids: np.ndarray, rng: np.random.Generator | None
    ) -> dict[str, np.ndarray]:
        """Transform one window.

        Args:
            tokens: (raw_length,) token ids of packed documents, each ending with EOS.
            document_ids: (raw_length,) int document index of each token (its EOS included).
            rng: the sample's generator, the only source of randomness; may be None when
                `uses_rng` is False.

        Returns:
            {key: array of `output_shapes(seq_len)[key]` and `output_dtypes()[key]`}.
        """
        tokens = _as_ids(tokens)
        document_ids = np.asarray(document_ids)
        if document_ids.shape != tokens.shape:
            raise ValueError(f"document_ids {document_ids.shape} != tokens {tokens.shape}")
        seq_len = self.seq_len_for(tokens.shape[0])
        self.check(seq_len)
        if rng is None and self.uses_rng:
            raise ValueError(f"{type(self).__name__} draws random numbers: pass an rng")
        return self._transform(tokens, document_ids, seq_len, rng)

    @abc.abstractmethod
    def _transform(
        self,
        tokens: np.ndarray,
        document_ids: np.ndarray,
        seq_len: int,
        rng: Any,
    ) -> dict[str, np.ndarray]: ...


def _positions_and_documents(
    document_ids: np.ndarray, *, reset_position_ids: bool, document_masking: bool
) -> dict[str, np.ndarray]:
    out = {
        "position_ids": document_positions(document_ids)
        if reset_position_ids
        else np.broadcast_to(
            np.arange(document_ids.shape[-1], dtype=np.int64), document_ids.shape
        ).copy()
    }
    if document_masking:
        out["document_ids"] = renumber_documents(document_ids)
    return out


# --------------------------------------------------------------------------------------------
# decoders and encoders


class CausalLM(Objective):
    """Next-token prediction on a packed row (decoders).

    Outputs, each (L,) for L = seq_len: `input_ids` = window[:-1]; `labels` = window[1:]
    (-100 where the label is the pad id); `position_ids`, restarting at 0 at each document when
    `reset_position_ids`, else 0..L-1; `document_ids` (row-local 0, 1, ...) only when
    `document_masking` (the key is omitted otherwise, so the decoder keeps SDPA's causal
    kernel). A document's EOS predicts the next document's first token, as in GPT packing.
    Consecutive windows overlap by one token (raw_length = seq_len + 1). Draws no random
    numbers; `batch` transforms a whole (B, raw_length) micro-batch at once.
    """

    uses_rng = False

    dtypes = {
        "input_ids": np.int64,
        "labels": np.int64,
        "position_ids": np.int64,
        "document_ids": np.int64,
    }

    def __init__(
        self, special: SpecialIds, *, document_masking: bool, reset_position_ids: bool
    ) -> None:
        super().__init__(special)
        self.document_masking = document_masking
        self.reset_position_ids = reset_position_ids

    def _raw_length(self, seq_len: int) -> int:
        return seq_len + 1

    def seq_len_for(self, raw_length: int) -> int:
        return raw_length - 1

    def output_shapes(self, seq_len: int) -> dict[str, tuple[int, ...]]:
        keys = ["input_ids", "labels", "position_ids"]
        keys += ["document_ids"] if self.document_masking else []
        return {key: (seq_len,) for key in keys}

    def output_dtypes(self) -> dict[str, Any]:
        return {key: self.dtypes[key] for key in self.output_shapes(1)}

    def _transform(
        self,
        tokens: np.ndarray,
        document_ids: np.ndarray,
        seq_len: int,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        return self.batch(tokens, document_ids)

    def batch(self, tokens: np.ndarray, document_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Transform (..., seq_len + 1) windows at once into (..., seq_len) arrays.

        The loader's hot path, so it does the least work: labels are a view unless the
        window holds a pad id, and the row-local ids the loader passes (0, 1, 2, ... counted
        from each row's start, non-decreasing) are used as they are.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        labels = tokens[..., 1:]  # (..., L)
        if (labels == self.special.pad).any():
            labels = np.where(labels == self.special.pad, IGNORE_INDEX, labels)
        documents = np.asarray(document_ids)[..., :-1]
        row_local = documents[..., :1].max(initial=0) == 0 if documents.size else True
        out = {"input_ids": tokens[..., :-1], "labels": labels}
        if not row_local or not self.reset_position_ids:
            return out | _positions_and_documents(
                documents,
                reset_position_ids=self.reset_position_ids,
                document_masking=self.document_masking,
            )
        out["position_ids"] = row_positions(documents)
        if self.document_masking:
            out["document_ids"] = documents.astype(np.int64, copy=False)
        return out


class MaskedLM(Objective):
    """BERT masked LM on a packed row (encoders).

    Exactly round(mask_prob x maskable tokens) positions are chosen, where maskable means not
    a special id (EOS, pad, mask, sentinels, ...); with `whole_word`, whole words are chosen
    until about that many tokens are covered. Each chosen token independently becomes the mask
    id (`replace_with_mask`), a random non-special id (`replace_with_random`), or stays.

    Outputs, each (L,) for L = seq_len: `input_ids`; `labels` = the original id at chosen
    positions, -100 elsewhere; `position_ids` and `document_ids` as in `CausalLM`;
    `token_type_ids` all 0.
    """

    dtypes = {
        "input_ids": np.int64,
        "labels": np.int64,
        "position_ids": np.int64,
        "token_type_ids": np.int64,
        "document_ids": np.int64,
    }

    def __init__(
        self,
        cfg: MaskedLMConfig,
        special: SpecialIds,
        vocab_size: int,
        *,
        document_masking: bool,
        reset_position_ids: bool,
        word_start: np.ndarray | None = None,
    ) -> None:
        super().__init__(special)
        if not 0.0 < cfg.mask_prob < 1.0:
            raise ValueError(f"objective.mask_prob={cfg.mask_prob} must be in (0, 1)")
        if min(cfg.replace_with_mask, cfg.replace_with_random) < 0 or (
            cfg.replace_with_mask + cfg.replace_with_random > 1.0
        ):
            raise ValueError(
                f"objective.replace_with_mask={cfg.replace_with_mask} and "
                f"objective.replace_with_random={cfg.replace_with_random} must be >= 0 and "
                "sum to at most 1"
            )
        if special.mask < 0:
            raise ValueError("masked LM needs a tokenizer with a <mask> token")
        self.cfg = cfg
        self.document_masking = document_masking
        self.reset_position_ids = reset_position_ids
        self.is_special = special.table(vocab_size)  # (V,)
        self.regular_ids = np.flatnonzero(~self.is_special)  # random replacements draw these
        if cfg.replace_with_random > 0 and self.regular_ids.size == 0:
            raise ValueError(f"a vocabulary of {vocab_size} has no non-special ids")
        self.word_start: np.ndarray | None = None
        if cfg.whole_word:
            if word_start is None:
                raise ValueError(
                    "objective.whole_word=true needs word_start (see "
                    "word_starts_from_sentencepiece)"
                )
            word_start = np.asarray(word_start, dtype=bool)
            if word_start.shape[0] < vocab_size:
                raise ValueError(
                    f"word_start covers {word_start.shape[0]} ids, the vocabulary has {vocab_size}"
                )
            self.word_start = word_start[:vocab_size] | self.is_special

    def _raw_length(self, seq_len: int) -> int:
        return seq_len

    def seq_len_for(self, raw_length: int) -> int:
        return raw_length

    def output_shapes(self, seq_len: int) -> dict[str, tuple[int, ...]]:
        keys = ["input_ids", "labels", "position_ids", "token_type_ids"]
        keys += ["document_ids"] if self.document_masking else []
        return {key: (seq_len,) for key in keys}

    def output_dtypes(self) -> dict[str, Any]:
        return {key: self.dtypes[key] for key in self.output_shapes(1)}

    def _transform(
        self,
        tokens: np.ndarray,
        document_ids: np.ndarray,
        seq_len: int,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        vocab = self.is_special.shape[0]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"token ids outside the vocabulary [0, {vocab})")
        maskable = ~self.is_special[tokens]  # (L,)
        count = round(self.cfg.mask_prob * int(maskable.sum()))
        if self.word_start is None:
            chosen = choose_positions(maskable, count, rng)  # (L,)
        else:
            words = word_ids(maskable, self.word_start[tokens], document_ids)
            chosen = choose_words(words, count, rng)  # (L,)
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        labels[labels == self.special.pad] = IGNORE_INDEX
        where = np.flatnonzero(chosen)
        draw = rng.random(where.shape[0])
        to_mask = draw < self.cfg.replace_with_mask
        to_random = ~to_mask & (draw < self.cfg.replace_with_mask + self.cfg.replace_with_random)
        inputs = tokens.copy()
        inputs[where[to_mask]] = self.special.mask
        picks = rng.integers(self.regular_ids.shape[0], size=int(to_random.sum()))
        inputs[where[to_random]] = self.regular_ids[picks]
        return {
            "input_ids": inputs,
            "labels": labels,
            "token_type_ids": np.zeros(seq_len, dtype=np.int64),
            **_positions_and_documents(
                document_ids,
                reset_position_ids=self.reset_position_ids,
                document_masking=self.document_masking,
            ),
        }


# --------------------------------------------------------------------------------------------
# encoder-decoders


class EncoderDecoderObjective(Objective):
    """Inputs and targets for `EncoderDecoder.forward`, padded to fixed lengths.

    Outputs: `input_ids` (S,) and `padding_mask` (S,) (True on real tokens), S = seq_len;
    `labels` (T,) (the target, -100 on padding), `decoder_input_ids` (T,) (the target shifted
    right behind start id = pad, as `shift_right` does) and `decoder_padding_mask` (T,),
    T = `target_length(seq_len)`. The encoder-decoder takes no document ids or positions
    (relative attention): packed documents are separated by their EOS only, as in T5.
    Trailing pad ids in a window count as absent (a short window is padded, not corrupted).
    """

    dtypes = {
        "input_ids": np.int64,
        "padding_mask": np.bool_,
        "decoder_input_ids": np.int64,
        "labels": np.int64,
        "decoder_padding_mask": np.bool_,
    }

    @abc.abstractmethod
    def target_length(self, seq_len: int) -> int:
        """T, the decoder length of every sample."""

    def output_shapes(self, seq_len: int) -> dict[str, tuple[int, ...]]:
        target = self.target_length(seq_len)
        return {
            "input_ids": (seq_len,),
            "padding_mask": (seq_len,),
            "decoder_input_ids": (target,),
            "labels": (target,),
            "decoder_padding_mask": (target,),
        }

    def _transform(
        self,
        tokens: np.ndarray,
        document_ids: np.ndarray,
        seq_len: int,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        return self.sample(tokens, seq_len, self.target_length(seq_len), rng)

    def sample(
        self, tokens: np.ndarray, seq_len: int, target_len: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """One sample from a window (trailing pads dropped), padded to (seq_len, target_len)."""
        real = np.flatnonzero(tokens != self.special.pad)
        tokens = tokens[: real[-1] + 1 if real.size else 0]
        inputs, targets = self._corrupt(tokens, seq_len, rng)
        return self._pack(inputs, targets, seq_len, target_len)

    @abc.abstractmethod
    def _corrupt(
        self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of `tokens` (N,), both ending with EOS."""

    def _pack(
        self, inputs: np.ndarray, targets: np.ndarray, seq_len: int, target_len: int
    ) -> dict[str, np.ndarray]:
        n_in, n_out = inputs.shape[0], targets.shape[0]
        if n_in > seq_len or n_out > target_len:  # the length arithmetic rules this out
            raise AssertionError(f"sample ({n_in}, {n_out}) exceeds ({seq_len}, {target_len})")
        pad = self.special.pad
        input_ids = np.full(seq_len, pad, dtype=np.int64)  # (S,)
        input_ids[:n_in] = inputs
        labels = np.full(target_len, IGNORE_INDEX, dtype=np.int64)  # (T,)
        labels[:n_out] = np.where(targets == pad, IGNORE_INDEX, targets)
        decoder_input_ids = np.full(target_len, pad, dtype=np.int64)  # (T,); start id = pad
        decoder_input_ids[1:n_out] = targets[:-1]
        return {
            "input_ids": input_ids,
            "padding_mask": np.arange(seq_len) < n_in,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "decoder_padding_mask": np.arange(target_len) < n_out,
        }


class SpanCorruption(EncoderDecoderObjective):
    """T5 span corruption: noise spans become sentinels in the input, and are restored after
    their sentinels in the target.

    The raw window is sized (`span_corruption_lengths`) so a full window's input is exactly
    seq_len tokens; the target is padded to the length the same arithmetic gives.
    """

    def __init__(
        self,
        special: SpecialIds,
        noise_density: float,
        mean_span_length: float,
        *,
        keys: tuple[str, str] = ("objective.noise_density", "objective.mean_span_length"),
    ) -> None:
        super().__init__(special)
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"{keys[0]}={noise_density} must be in (0, 1)")
        if mean_span_length < 1.0:
            raise ValueError(f"{keys[1]}={mean_span_length} must be >= 1")
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.keys = keys
        self.sentinels = np.asarray(special.sentinels, dtype=np.int64)

    def _lengths(self, seq_len: int) -> tuple[int, int]:
        return _cached_span_lengths(seq_len, self.noise_density, self.mean_span_length)

    def _raw_length(self, seq_len: int) -> int:
        return self._lengths(seq_len)[0]

    def target_length(self, seq_len: int) -> int:
        return self._lengths(seq_len)[1]

    def _check(self, seq_len: int) -> None:
        raw, target = self._lengths(seq_len)
        noise, spans = noise_counts(raw, self.noise_density, self.mean_span_length)
        density = f"{self.keys[0]}={self.noise_density}"
        span = f"{self.keys[1]}={self.mean_span_length}"
        if raw - noise + spans + 1 != seq_len or noise + spans + 1 != target:
            raise ValueError(
                f"data.seq_len={seq_len} is too short for span corruption with {density}, "
                f"{span} (a {raw}-token window has {noise} noise tokens)"
            )
        if spans > len(self.sentinels):
            raise ValueError(
                f"span corruption with {density}, {span} makes {spans} noise spans per sample "
                f"at data.seq_len={seq_len}, but the tokenizer has only {len(self.sentinels)} "
                f"sentinels (tokenizer.n_sentinels={len(self.sentinels)}); retrain the "
                f"tokenizer with tokenizer.n_sentinels >= {spans}, or lower data.seq_len, or "
                f"raise {self.keys[1]}"
            )

    def _corrupt(
        self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        noise = random_spans_noise_mask(
            tokens.shape[0], self.noise_density, self.mean_span_length, rng
        )
        return corrupt_spans(tokens, noise, self.sentinels, self.special.eos)


class PrefixLM(EncoderDecoderObjective):
    """UL2's S-denoiser: continue a prefix. Input = the first seq_len - 1 tokens, then EOS;
    target = the next 1 to seq_len // 4 tokens (uniformly many), then EOS.

    The split point is random in the sense that the suffix length is; the prefix always fills
    the encoder (no padding in a full window). A short window keeps the same suffix range
    (capped to leave a prefix of at least one token) and its prefix is whatever precedes it.
    """

    def _raw_length(self, seq_len: int) -> int:
        return prefix_lm_lengths(seq_len)[0]

    def target_length(self, seq_len: int) -> int:
        return prefix_lm_lengths(seq_len)[1]

    def _check(self, seq_len: int) -> None:
        if seq_len < 4:
            raise ValueError(f"data.seq_len={seq_len} is too short for prefix LM (needs >= 4)")

    def _corrupt(
        self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n = tokens.shape[0]
        suffix = int(rng.integers(1, min(seq_len // 4, n - 1) + 1)) if n >= 2 else 0
        split = min(seq_len - 1, n - suffix)
        eos = [self.special.eos]
        return (
            np.concatenate([tokens[:split], eos]).astype(np.int64),
            np.concatenate([tokens[split : split + suffix], eos]).astype(np.int64),
        )


class UL2(EncoderDecoderObjective):
    """UL2's mixture of denoisers, chosen per sample with probability proportional to the
    weights: R (`SpanCorruption` with the r_ settings), S (`PrefixLM`), X (`SpanCorruption`
    with the x_ settings). Denoisers with weight 0 are off.

    Every sample has the same shapes: input seq_len, target the longest target of the enabled
    denoisers (`ul2_lengths`). The window is the longest raw length they need; a denoiser that
    needs fewer tokens uses a prefix of it. UL2's mode tokens ([R], [S], [X]) are not added:
    kiln tokenizers have none, so the model is not told which denoiser made a sample.
    """

    def __init__(self, cfg: UL2Config, special: SpecialIds) -> None:
        super().__init__(special)
        weights = {"R": cfg.r_weight, "S": cfg.s_weight, "X": cfg.x_weight}
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"objective.{name.lower()}_weight={weight} must be >= 0")
        if sum(weights.values()) <= 0:
            raise ValueError("objective.r_weight, s_weight and x_weight are all 0: set one > 0")
        self.cfg = cfg
        r_keys = ("objective.r_noise_density", "objective.r_mean_span_length")
        x_keys = ("objective.x_noise_density", "objective.x_mean_span_length")
        every: dict[str, EncoderDecoderObjective] = {
            "R": SpanCorruption(special, cfg.r_noise_density, cfg.r_mean_span_length, keys=r_keys),
            "S": PrefixLM(special),
            "X": SpanCorruption(special, cfg.x_noise_density, cfg.x_mean_span_length, keys=x_keys),
        }
        self.names = tuple(name for name, weight in weights.items() if weight > 0)
        self.denoisers = {name: every[name] for name in self.names}
        total = sum(weights[name] for name in self.names)
        self.probabilities = np.array([weights[name] / total for name in self.names])

    def _raw_length(self, seq_len: int) -> int:
        return max(denoiser._raw_length(seq_len) for denoiser in self.denoisers.values())

    def target_length(self, seq_len: int) -> int:
        return max(denoiser.target_length(seq_len) for denoiser in self.denoisers.values())

    def _check(self, seq_len: int) -> None:
        for denoiser in self.denoisers.values():
            denoiser.check(seq_len)

    def choose(self, rng: np.random.Generator) -> str:
        """The denoiser of one sample ("R", "S" or "X"); the first draw from its generator."""
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]

    def sample(
        self, tokens: np.ndarray, seq_len: int, target_len: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """One sample of a denoiser drawn from `rng`, from the prefix of `tokens` it needs."""
        denoiser = self.denoisers[self.choose(rng)]
        window = tokens[: denoiser._raw_length(seq_len)]
        return denoiser.sample(window, seq_len, target_len, rng)

    def _corrupt(
        self, tokens: np.ndarray, seq_len: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("UL2 delegates each sample to one denoiser's `sample`")


# --------------------------------------------------------------------------------------------
# building


def build_objective(
    cfg: ObjectiveConfig,
    special: SpecialIds,
    vocab_size: int,
    *,
    document_masking: bool,
    reset_position_ids: bool,
    word_start: np.ndarray | None = None,
) -> Objective:
    """The transform for `cfg` (`cfg.objective` of a `KilnConfig`).

    Args:
        cfg: a `CausalLMConfig`, `MaskedLMConfig`, `SpanCorruptionConfig` or `UL2Config`.
        special: the tokenizer's special ids (`SpecialIds.from_manifest`).
        vocab_size: the tokenizer's vocabulary size (masked LM draws random replacements
            below it; pass the tokenizer's, not a padded `model.vocab_size`).
        document_masking: `data.document_masking`; decoders and encoders get `document_ids`.
        reset_position_ids: `data.reset_position_ids`; positions restart at each document.
            Both flags are ignored by the encoder-decoder objectives (see
            `EncoderDecoderObjective`).
        word_start: (vocab_size,) bool, True for pieces that start a word; needed by masked
            LM with `whole_word` (`word_starts_from_sentencepiece`).
    """
    special.table(vocab_size)  # every special id inside the vocabulary
    flags = {"document_masking": document_masking, "reset_position_ids": reset_position_ids}
    if isinstance(cfg, CausalLMConfig):
        return CausalLM(special, **flags)
    if isinstance(cfg, MaskedLMConfig):
        return MaskedLM(cfg, special, vocab_size, word_start=word_start, **flags)
    if isinstance(cfg, SpanCorruptionConfig):
        return SpanCorruption(special, cfg.noise_density, cfg.mean_span_length)
    if isinstance(cfg, UL2Config):
        return UL2(cfg, special)
    raise ValueError(f"objective={cfg.kind} has no transform")
