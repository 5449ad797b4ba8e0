"""Our SentencePiece tokenizer as a transformers tokenizer directory.

transformers 5 has one fast (Rust `tokenizers`) class that is not tied to a model family,
`TokenizersBackend`. Loaded from a directory that holds only `tokenizer.model` and a
`tokenizer_config.json` naming that class, it converts the SentencePiece model following the
model's own settings (`SpmConverter.build_tokenizer_from_spm_proto`): the identity normaliser
with spaces escaped to "▁", no dummy prefix, BPE merges ranked by piece score, byte fallback,
and user-defined pieces (`<mask>`, `<extra_id_N>`) isolated before BPE. Its `save_pretrained`
then writes `tokenizer.json`, which later loads need, with no conversion.

So an export holds `tokenizer.model` (for SentencePiece users), `tokenizer.json` and
`tokenizer_config.json` (class `TokenizersBackend`, the special tokens pad/unk/bos/eos/mask,
the sentinels as `extra_special_tokens`, `split_special_tokens=true`). No BOS is added by
`encode`, and no EOS except for an encoder-decoder, whose training inputs end with one (as
T5's tokenizers do): kiln's shards hold documents each followed by EOS. The export is
verified: `AutoTokenizer`
on the result must encode a set of probe texts exactly as SentencePiece does, or it fails.

Control pieces written in text ("</s>") are spelled out as SentencePiece does
(`split_special_tokens`), with one known exception: a text, or a stretch between two
`<mask>`/sentinel pieces, that is exactly a control piece encodes as that piece's id (the
converted BPE looks whole stretches up in the vocabulary first). A Unigram model (not kiln's
default) may also split a stretch differently where two segmentations score exactly the same
(seen on long runs of spaces): the same likelihood, other ids.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
SPECIALS = (PAD, UNK, BOS, EOS, MASK)  # at ids 0..4 in every kiln tokenizer

# Encoded by SentencePiece and by the exported tokenizer; any difference fails the export.
PROBES = (
    "def f(x):\n    return x + 12345\n",
    "\tif a  ==  b:\n\t\tpass\n\n\n",
    "  leading spaces and trailing  ",
    "naïve café → 😀 日本語 Ωmega",
    "x = 3.14159e-10 # comment",
    "<mask> a <extra_id_0>b<extra_id_1> c",
    " ",
    "\n",
    "a",
)


def _pieces(path: Path) -> list[str]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(path))
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def sentinels(pieces: list[str]) -> list[str]:
    """The `<extra_id_N>` pieces, in order, as long as they run contiguously from 0."""
    found = []
    known = set(pieces)
    while f"<extra_id_{len(found)}>" in known:
        found.append(f"<extra_id_{len(found)}>")
    return found


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """ValueError unless `path` is a kiln SentencePiece model that fits a `vocab_size` model."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    pieces = _pieces(path)
    if tuple(pieces[:5]) != SPECIALS:
        raise ValueError(
            f"tokenizer {path} has {pieces[:5]} at ids 0-4, not kiln's {list(SPECIALS)}"
        )
    if len(pieces) > vocab_size:
        raise ValueError(
            f"tokenizer {path} has {len(pieces)} pieces but model.vocab_size={vocab_size}"
        )


def export_tokenizer(
    path: Path,
    out_dir: Path,
    *,
    model_max_length: int,
    padding_side: str = "right",
    append_eos: bool = False,
) -> None:
    """Write `tokenizer.model`, `tokenizer.json` and `tokenizer_config.json` into `out_dir`
    (an existing directory) and check that `AutoTokenizer` encodes the probes like
    SentencePiece. Raises ValueError when it does not.

    With `append_eos` (an encoder-decoder, whose span-corruption inputs and targets end with
    EOS in training, as T5's), encoding with special tokens, transformers' default, appends
    `</s>`, as T5's own tokenizers do. Otherwise it adds nothing: decoders and encoders train
    on packed documents, each followed by EOS, with no BOS."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, TokenizersBackend

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(Path(path).read_bytes())
    pieces = _pieces(path)
    config = {
        "tokenizer_class": "TokenizersBackend",
        "pad_token": PAD,
        "unk_token": UNK,
        "bos_token": BOS,
        "eos_token": EOS,
        "mask_token": MASK,
        "extra_special_tokens": sentinels(pieces),
        "model_max_length": model_max_length,
        "padding_side": padding_side,
        "clean_up_tokenization_spaces": False,
        # SentencePiece spells out "<s>", "</s>", "<pad>" and "<unk>" found in text; without
        # this, transformers would turn them into the control ids. <mask> and the sentinels
        # stay whole: the converted pre-tokenizer isolates them (user-defined pieces).
        "split_special_tokens": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    TokenizersBackend.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))
    if append_eos:
        from tokenizers import Tokenizer, processors

        fast = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
        fast.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 3)]
        )
        fast.save(str(out_dir / "tokenizer.json"))

    processor = spm.SentencePieceProcessor(model_file=str(path))
    exported = AutoTokenizer.from_pretrained(str(out_dir))
    for text in PROBES:
        ours = processor.encode(text)
        theirs = exported.encode(text, add_special_tokens=False)
        if ours != theirs:
            raise ValueError(
                f"exported tokenizer encodes {text!r} as {theirs}, SentencePiece as {ours}"
            )
    ids = {name: getattr(exported, f"{name}_token_id") for name in ("pad", "unk", "bos", "eos")}
    ids["mask"] = exported.mask_token_id
    if list(ids.values()) != [0, 1, 2, 3, 4]:
        raise ValueError(f"exported tokenizer has special ids {ids}, expected 0-4")
    framed = exported.encode(PROBES[0])
    expected = [*processor.encode(PROBES[0]), *([3] if append_eos else [])]
    if framed != expected:
        raise ValueError(f"exported tokenizer frames {PROBES[0]!r} as {framed}, not {expected}")
