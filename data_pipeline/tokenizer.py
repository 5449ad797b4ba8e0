"""SentencePiece tokenizer: training with the special tokens all three objectives need, loading.

Special tokens and their fixed ids (the same in every tokenizer kiln trains):

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <mask>   5.. <extra_id_0> .. <extra_id_{n-1}>

`<mask>` serves masked LM; `<extra_id_N>` are T5's span-corruption sentinels. They are
user-defined symbols, so they are never split and SentencePiece's `encode` of the literal text
gives the id (as transformers' T5 tokenizers do, which lets a prompt name a sentinel). A corpus
is not a prompt: a document that contains the text "<mask>" (HTML, a tokenizer's own source
code) must not put mask or sentinel ids into the shards, where the objectives would take them
for their own. `encode_as_written` spells such text out in ordinary pieces.

Text is kept as it is: the identity normaliser and no whitespace folding, because the default
corpus is Python source code, where indentation and newlines carry meaning. Normalisation
(Unicode NFC, line endings) is the pipeline's normalize stage, done before training and encoding.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipeline.shards import atomic_write_bytes
from pretrain.config import TokenizerConfig

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
# SentencePiece skips training "sentences" longer than this; documents are cut at line breaks
# into pieces below it so long files still contribute.
MAX_SENTENCE_BYTES = 1 << 14


def sentinel(index: int) -> str:
    return f"<extra_id_{index}>"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about a tokenizer (and the trainer checks against the model)."""

    path: str
    sha256: str
    vocab_size: int
    model_type: str
    special_ids: dict[str, int] = field(default_factory=dict)
    sentinel_ids: list[int] = field(default_factory=list)


def training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents at line breaks into pieces SentencePiece accepts, keeping the newlines."""
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            length = len(line.encode("utf-8", "replace"))
            if piece and size + length > MAX_SENTENCE_BYTES:
                yield "".join(piece)
                piece, size = [], 0
            if length <= MAX_SENTENCE_BYTES:  # a single giant line is dropped from training only
                piece.append(line)
                size += length
        if piece:
            yield "".join(piece)


class TokenizerError(ValueError):
    """Tokenizer settings this corpus cannot train; the message names the key to change."""


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, path: Path, threads: int = 1
) -> TokenizerInfo:
    """Train a SentencePiece model on `texts` and write it atomically to `path`.

    Args:
        texts: the training sample (already drawn across sources by weight, in a fixed order).
        cfg: tokenizer settings (type, vocabulary size, byte fallback, sentinels).
        path: where the `.model` file goes.
        threads: SentencePiece trainer threads (the result does not depend on it).
    """
    spm.set_random_generator_seed(1)
    model = io.BytesIO()
    specials = [MASK] + [sentinel(i) for i in range(cfg.n_sentinels)]
    try:
        _train(texts, cfg, model, specials, threads)
    except RuntimeError as error:
        # SentencePiece's own words: "Vocabulary size too high (600). Please set it to a
        # value <= 533."
        found = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(error))
        # "Vocabulary size is smaller than required_chars. 400 vs 450."
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if small is not None:
            raise TokenizerError(
                f"tokenizer.vocab_size={cfg.vocab_size} is less than the {small[2]} pieces this "
                "corpus needs for its characters and the special tokens; raise "
                f"tokenizer.vocab_size to at least {small[2]}, or lower "
                f"tokenizer.character_coverage={cfg.character_coverage} (rare characters then "
                "become unknown), and add overwrite=true"
            ) from None
        if found is None:
            raise
        raise TokenizerError(
            f"tokenizer.vocab_size={cfg.vocab_size} is more than this corpus's tokenizer sample "
            f"supports (at most {found[2]} pieces); lower tokenizer.vocab_size, or give it more "
            "text (more documents or sources, tokenizer.sample_bytes), and add overwrite=true "
            "(this unfinished build's outputs are for its own settings)"
        ) from None
    atomic_write_bytes(path, model.getvalue())
    return load_tokenizer_info(path)


def _train(
    texts: Iterable[str], cfg: TokenizerConfig, model: io.BytesIO, specials: list[str], threads: int
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(texts),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        user_defined_symbols=specials,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,  # "x" encodes as "x", not "▁x": documents are concatenated as-is
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=MAX_SENTENCE_BYTES,
        shuffle_input_sentence=False,  # the sample is already drawn deterministically
        input_sentence_size=0,
        num_threads=threads,
        minloglevel=2,
    )


def objective_pieces(processor: spm.SentencePieceProcessor) -> dict[int, str]:
    """The pieces only the objectives may place: `<mask>` and the sentinels, by id."""
    found: dict[int, str] = {}
    if (mask := processor.piece_to_id(MASK)) != processor.unk_id():
        found[mask] = MASK
    index = 0
    while (token := processor.piece_to_id(sentinel(index))) != processor.unk_id():
        found[token] = sentinel(index)
        index += 1
    return found


def encode_as_written(
    processor: spm.SentencePieceProcessor, texts: list[str], reserved: dict[int, str]
) -> list[np.ndarray]:
    """Encode documents as `int64` arrays in which no `reserved` id comes from the text.

    A document whose plain encoding holds a reserved id is encoded again piece by piece: the
    text around each occurrence as usual, the occurrence without its last character, then that
    character ("<mask" and ">"), so it decodes back to the same text.
    """
    encoded = [
        np.asarray(ids, dtype=np.int64)
        for ids in processor.encode(texts, out_type=int, num_threads=1)
    ]
    if not reserved:
        return encoded
    ids = np.fromiter(reserved, dtype=np.int64)
    low, high = int(ids.min()), int(ids.max())
    pattern = re.compile("|".join(re.escape(piece) for piece in reserved.values()))
    for i, array in enumerate(encoded):
        if not ((array >= low) & (array <= high)).any() or not np.isin(array, ids).any():
            continue
        text, parts, at = texts[i], [], 0
        for found in pattern.finditer(text):
            parts += [text[at : found.start()], found[0][:-1], found[0][-1:]]
            at = found.end()
        parts.append(text[at:])
        pieces = processor.encode([part for part in parts if part], out_type=int, num_threads=1)
        encoded[i] = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64)
    return encoded


def load_tokenizer_info(path: Path) -> TokenizerInfo:
    """Read a `.model` file and describe it; raises ValueError if special tokens are missing."""
    processor = load_processor(path)
    special_ids = {
        "pad": processor.pad_id(),
        "unk": processor.unk_id(),
        "bos": processor.bos_id(),
        "eos": processor.eos_id(),
        "mask": processor.piece_to_id(MASK),
    }
    if special_ids["mask"] == processor.unk_id():
        special_ids["mask"] = -1
    sentinel_ids = []
    while (token := processor.piece_to_id(sentinel(len(sentinel_ids)))) != processor.unk_id():
        sentinel_ids.append(token)
    missing = [name for name, token in special_ids.items() if token < 0]
    if missing:
        raise ValueError(f"tokenizer {path} lacks special tokens: {', '.join(missing)}")
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(
        _model_type_code(path), "unknown"
    )
    return TokenizerInfo(
        path=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        vocab_size=processor.vocab_size(),
        model_type=model_type,
        special_ids=special_ids,
        sentinel_ids=sentinel_ids,
    )


def load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    return spm.SentencePieceProcessor(model_file=str(path))


def _model_type_code(path: Path) -> int:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto.trainer_spec.model_type
