"""SentencePiece training: special tokens at fixed ids, lossless round trips, determinism."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest

from data_pipeline.tokenizer import (
    MASK,
    TokenizerError,
    encode_as_written,
    load_processor,
    load_tokenizer_info,
    objective_pieces,
    sentinel,
    train_tokenizer,
)
from pretrain.config import TokenizerConfig

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def sample() -> list[str]:
    files = sorted(STDLIB.glob("[a-f]*.py"))[:60]
    return [path.read_text("utf-8") for path in files]


@pytest.fixture(scope="module")
def trained(sample: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(sample, TokenizerConfig(vocab_size=1024, n_sentinels=10), path)
    return path


def test_special_tokens_have_fixed_ids(trained: Path) -> None:
    info = load_tokenizer_info(trained)
    assert info.vocab_size == 1024
    assert info.special_ids == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    assert info.sentinel_ids == list(range(5, 15))
    processor = load_processor(trained)
    assert processor.encode(MASK) == [4]
    text = f"x = 1 {sentinel(0)} y {sentinel(9)}"
    pieces = processor.encode(text, out_type=str)
    assert sentinel(0) in pieces and sentinel(9) in pieces  # never split


def test_a_document_that_writes_a_special_token_keeps_it_as_text(trained: Path) -> None:
    """A corpus that contains the text "<mask>" or "<extra_id_3>" (HTML, a tokenizer's source)
    must not put the objectives' own ids into the shards: it is spelled out in plain pieces."""
    processor = load_processor(trained)
    reserved = objective_pieces(processor)
    assert reserved == {4: MASK, **{5 + i: sentinel(i) for i in range(10)}}
    texts = [
        f"tok = '{MASK}' # {sentinel(3)}{sentinel(9)}x\n",
        "def f():\n    return 1\n",
        f"{sentinel(0)}",
    ]
    encoded = encode_as_written(processor, texts, reserved)
    for ids, text in zip(encoded, texts, strict=True):
        assert not set(ids.tolist()) & set(reserved), text
        assert processor.decode(ids.tolist()) == text
    assert encoded[1].tolist() == processor.encode(texts[1])  # a document without one: unchanged
    assert 4 in processor.encode(texts[0])  # what plain SentencePiece would have written


@pytest.mark.parametrize("name", ["os.py", "json/decoder.py", "textwrap.py"])
def test_round_trip_is_lossless_on_source_code(trained: Path, name: str) -> None:
    processor = load_processor(trained)
    text = (STDLIB / name).read_text("utf-8")
    assert processor.decode(processor.encode(text)) == text  # indentation, newlines, tabs kept


def test_byte_fallback_covers_unseen_characters(trained: Path) -> None:
    processor = load_processor(trained)
    text = "naïve → 😀 \t tab\n"
    ids = processor.encode(text)
    assert processor.unk_id() not in ids
    assert processor.decode(ids) == text


def test_training_is_deterministic(sample: list[str], trained: Path, tmp_path: Path) -> None:
    again = train_tokenizer(
        sample, TokenizerConfig(vocab_size=1024, n_sentinels=10), tmp_path / "t.model"
    )
    assert Path(again.path).read_bytes() == trained.read_bytes()
    assert again.sha256 == load_tokenizer_info(trained).sha256
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_unigram_model(sample: list[str], tmp_path: Path) -> None:
    info = train_tokenizer(
        sample,
        TokenizerConfig(model_type="unigram", vocab_size=800, n_sentinels=3),
        tmp_path / "u.model",
    )
    assert info.model_type == "unigram" and info.vocab_size == 800
    assert info.sentinel_ids == [5, 6, 7]


def test_missing_model_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer_info(tmp_path / "nope.model")


def test_a_vocabulary_too_small_for_the_characters_names_the_key(tmp_path: Path) -> None:
    """SentencePiece's INTERNAL error for fewer pieces than required characters plus special
    tokens becomes one line naming the smallest tokenizer.vocab_size that works."""
    sample = [
        "".join(chr(c) for c in range(0x4E00 + i * 60, 0x4E00 + i * 60 + 60)) for i in range(5)
    ]
    with pytest.raises(TokenizerError) as error:
        train_tokenizer(sample * 3, TokenizerConfig(vocab_size=200), tmp_path / "t.model")
    needed = int(re.search(r"less than the (\d+) pieces", str(error.value))[1])
    assert needed > 300 and str(error.value) == (
        f"tokenizer.vocab_size=200 is less than the {needed} pieces this corpus needs for its "
        f"characters and the special tokens; raise tokenizer.vocab_size to at least {needed}, or "
        "lower tokenizer.character_coverage=0.9999 (rare characters then become unknown), and "
        "add overwrite=true"
    )
    assert not (tmp_path / "t.model").exists()
    train_tokenizer(sample * 3, TokenizerConfig(vocab_size=needed), tmp_path / "t.model")


def test_a_vocabulary_the_sample_cannot_fill_names_the_key(tmp_path: Path) -> None:
    """SentencePiece's refusal of a vocabulary larger than the sample supports becomes one line
    naming tokenizer.vocab_size and the largest it could be; nothing is written."""
    sample = ["a few words, ", "not many at all. "] * 5
    with pytest.raises(
        TokenizerError,
        match=r"tokenizer.vocab_size=600 is more than .* \(at most \d+ pieces\); .* and add "
        r"overwrite=true \(this unfinished build's outputs are for its own settings\)$",
    ):
        train_tokenizer(sample, TokenizerConfig(vocab_size=600), tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
