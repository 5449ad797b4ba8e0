"""Objective transforms: shapes, exact reconstructions, and sampling statistics."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipeline.shards import TokenizerRecord
from pretrain.config import CausalLMConfig, MaskedLMConfig, SpanCorruptionConfig, UL2Config
from pretrain.noising import (
    corrupt_spans,
    document_positions,
    ids_after_ends,
    random_segmentation,
    random_spans_noise_mask,
    row_positions,
)
from pretrain.objectives import (
    UL2,
    Objective,
    SpecialIds,
    build_objective,
    encoder_decoder_lengths,
    prefix_lm_lengths,
    span_corruption_lengths,
    word_starts_from_sentencepiece,
)

VOCAB = 1000
SPECIAL = SpecialIds(sentinels=tuple(range(5, 105)))
FIRST_REGULAR = 105
EOS, PAD, MASK = SPECIAL.eos, SPECIAL.pad, SPECIAL.mask
SENTINELS = np.array(SPECIAL.sentinels)


def window(rng: np.random.Generator, length: int, doc_rate: float = 0.01):
    """Packed tokens (documents ending with EOS) and the loader's document ids."""
    tokens = rng.integers(FIRST_REGULAR, VOCAB, size=length)
    tokens[rng.random(length) < doc_rate] = EOS
    documents = np.concatenate([[0], np.cumsum(tokens[:-1] == EOS)]).astype(np.int32)
    return tokens, documents


def build(cfg, special: SpecialIds = SPECIAL, **kwargs) -> Objective:
    flags = {"document_masking": True, "reset_position_ids": True} | kwargs
    return build_objective(cfg, special, VOCAB, **flags)


def check_shapes(objective: Objective, out: dict[str, np.ndarray], seq_len: int) -> None:
    shapes = objective.output_shapes(seq_len)
    assert set(out) == set(shapes)
    for key, shape in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == objective.output_dtypes()[key], key


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The raw tokens behind a span-corrupted (input, target) pair (both EOS-terminated)."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    is_sentinel = np.isin(targets, SENTINELS)
    bounds = np.flatnonzero(is_sentinel).tolist() + [len(targets) - 1]
    spans = {targets[a]: targets[a + 1 : b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
    pieces = [spans[t] if t in spans else np.array([t]) for t in inputs[:-1]]
    return np.concatenate(pieces) if pieces else np.array([], dtype=np.int64)


def unpack(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) without padding, from an encoder-decoder sample."""
    inputs = out["input_ids"][out["padding_mask"]]
    targets = out["labels"][out["decoder_padding_mask"]]
    return inputs, targets


# -- special ids ----------------------------------------------------------------------------


def test_special_ids_from_manifest_record_dict_and_manifest() -> None:
    special = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    record = TokenizerRecord("t.model", "ab", VOCAB, "bpe", special, [5, 6, 7])
    expected = SpecialIds(sentinels=(5, 6, 7))
    assert SpecialIds.from_manifest(record) == expected
    assert SpecialIds.from_manifest({"special_ids": special, "sentinel_ids": [5, 6, 7]}) == expected
    assert (
        SpecialIds.from_manifest({"tokenizer": {"special_ids": special, "sentinel_ids": [5, 6, 7]}})
        == expected
    )
    assert SpecialIds.from_manifest(SimpleNamespace(tokenizer=record)) == expected
    with pytest.raises(ValueError, match="mask"):
        SpecialIds.from_manifest({"special_ids": {"pad": 0}, "sentinel_ids": []})


# -- causal LM ------------------------------------------------------------------------------


def test_causal_lm_shifts_labels_and_restarts_positions_per_document() -> None:
    objective = build(CausalLMConfig())
    assert objective.raw_length(8) == 9
    tokens = np.array([10, 11, EOS, 12, 13, 14, EOS, 15, 16])
    documents = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2], dtype=np.int32)
    out = objective(tokens, documents, None)
    check_shapes(objective, out, 8)
    assert out["input_ids"].tolist() == [10, 11, EOS, 12, 13, 14, EOS, 15]
    assert out["labels"].tolist() == [11, EOS, 12, 13, 14, EOS, 15, 16]
    assert out["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert out["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]

    plain = build(CausalLMConfig(), document_masking=False, reset_position_ids=False)
    out = plain(tokens, documents, None)
    check_shapes(plain, out, 8)
    assert "document_ids" not in out
    assert out["position_ids"].tolist() == list(range(8))

    padded = objective(np.array([10, 11, EOS, PAD, PAD]), np.array([0, 0, 0, 1, 1]), None)
    assert padded["labels"].tolist() == [11, EOS, -100, -100]


def test_causal_lm_batch_matches_rows() -> None:
    objective = build(CausalLMConfig())
    rng = np.random.default_rng(0)
    rows = [window(rng, 65, doc_rate=0.1) for _ in range(4)]
    batch = objective.batch(np.stack([t for t, _ in rows]), np.stack([d for _, d in rows]))
    for i, (tokens, documents) in enumerate(rows):
        for key, value in objective(tokens, documents, None).items():
            assert np.array_equal(batch[key][i], value), key


# -- masked LM ------------------------------------------------------------------------------


@pytest.mark.parametrize("end_rate", [0.0, 0.0005, 0.01, 0.3])
def test_sparse_document_ids_and_positions_equal_the_dense_scans(end_rate: float) -> None:
    """The loader's sparse boundary fix-up (few EOS per row) and its dense fallback (many)
    give what a running count and `document_positions` give."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 100, size=(8, 257))
    tokens[rng.random(tokens.shape) < end_rate] = 3
    tokens[0, 0] = tokens[1, -2] = tokens[2, -1] = 3  # a row-first, a last-input, a last token
    ids = ids_after_ends(tokens, 3)
    expected = np.zeros(tokens.shape, dtype=np.int64)
    expected[:, 1:] = np.cumsum(tokens[:, :-1] == 3, axis=1)
    assert ids.dtype == np.int64 and np.array_equal(ids, expected)
    inputs = ids[:, :-1]
    assert np.array_equal(row_positions(inputs), document_positions(inputs))
    assert np.array_equal(row_positions(inputs[3]), document_positions(inputs[3]))


def test_masked_lm_statistics() -> None:
    cfg = MaskedLMConfig()
    objective = build(cfg)
    special_ids = np.array(SPECIAL.all_ids)
    chosen = maskable = to_mask = to_random = kept = 0
    for index in range(2000):
        tokens, documents = window(np.random.default_rng([1, index]), 512, doc_rate=0.02)
        out = objective(tokens, documents, np.random.default_rng([2, index]))
        check_shapes(objective, out, 512)
        inputs, labels = out["input_ids"], out["labels"]
        selected = labels != -100
        n_maskable = int((tokens != EOS).sum())
        assert selected.sum() == round(cfg.mask_prob * n_maskable)  # exactly, per sample
        assert np.array_equal(labels[selected], tokens[selected])
        assert not selected[tokens == EOS].any()  # never EOS (or any special id)
        assert np.array_equal(inputs[~selected], tokens[~selected])
        replaced = inputs[selected]
        random = (replaced != MASK) & (replaced != tokens[selected])
        assert not np.isin(replaced[random], special_ids).any()  # random ids are never special
        assert (replaced[random] >= FIRST_REGULAR).all() and (replaced[random] < VOCAB).all()
        chosen += int(selected.sum())
        maskable += n_maskable
        to_mask += int((replaced == MASK).sum())
        to_random += int(random.sum())
        kept += int((replaced == tokens[selected]).sum())
        assert np.array_equal(out["token_type_ids"], np.zeros(512))
        assert np.array_equal(out["document_ids"], documents)
    assert abs(chosen / maskable - 0.15) < 0.005
    assert abs(to_mask / chosen - 0.8) < 0.02
    assert abs(to_random / chosen - 0.1) < 0.02
    assert abs(kept / chosen - 0.1) < 0.02


def test_masked_lm_whole_word_masks_words_together() -> None:
    word_start = np.arange(VOCAB) % 3 == 0  # a third of the pieces start a word
    objective = build(MaskedLMConfig(whole_word=True), word_start=word_start)
    chosen = maskable = 0
    for index in range(500):
        tokens, documents = window(np.random.default_rng([3, index]), 512, doc_rate=0.02)
        out = objective(tokens, documents, np.random.default_rng([4, index]))
        selected = out["labels"] != -100
        assert not selected[tokens == EOS].any()
        # words: a start piece, the row start, or the token after an EOS opens a new word
        starts = word_start[tokens] | (tokens == EOS)
        starts[0] = True
        starts[1:] |= tokens[:-1] == EOS
        word = np.cumsum(starts)
        for w in np.unique(word[selected]):
            members = (word == w) & (tokens != EOS)
            assert selected[members].all()
        chosen += int(selected.sum())
        maskable += int((tokens != EOS).sum())
    assert abs(chosen / maskable - 0.15) < 0.005


def test_masked_lm_needs_word_starts_for_whole_words() -> None:
    with pytest.raises(ValueError, match="word_start"):
        build(MaskedLMConfig(whole_word=True))


def test_word_starts_from_sentencepiece(tmp_path: Path) -> None:
    from data_pipeline.tokenizer import train_tokenizer
    from pretrain.config import TokenizerConfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text("utf-8") for name in ("textwrap.py", "glob.py")]
    path = tmp_path / "t.model"
    info = train_tokenizer(texts, TokenizerConfig(vocab_size=400, n_sentinels=3), path)
    starts = word_starts_from_sentencepiece(path)
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert starts.shape == (info.vocab_size,)
    assert starts[: 5 + 3].all()  # special pieces, sentinels included
    assert all(starts[token] for token in range(8, 400) if processor.is_byte(token))
    for token in range(8 + 256, 400):
        piece = processor.id_to_piece(token)
        assert starts[token] == (piece[0] == "▁" or piece[0].isspace()), piece


# -- span corruption ------------------------------------------------------------------------


def test_random_segmentation_is_uniform_over_compositions() -> None:
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(6000):
        parts = tuple(random_segmentation(5, 3, rng).tolist())
        assert sum(parts) == 5 and min(parts) >= 1
        counts[parts] = counts.get(parts, 0) + 1
    assert len(counts) == 6  # C(4, 2) compositions, about 1000 each
    assert all(800 < n < 1200 for n in counts.values())


def test_noise_mask_alternates_starting_clean() -> None:
    mask = random_spans_noise_mask(100, 0.15, 3.0, np.random.default_rng(0))
    assert mask.sum() == 15 and not mask[0] and mask[-1]
    assert (np.diff(mask.astype(int)) == 1).sum() == 5  # round(15 / 3) spans
    inputs, targets = corrupt_spans(np.arange(200, 300), mask, SENTINELS, EOS)
    assert np.array_equal(reconstruct(inputs, targets), np.arange(200, 300))


@pytest.mark.parametrize("seq_len", [512, 100])
def test_span_corruption_statistics_and_reconstruction(seq_len: int) -> None:
    cfg = SpanCorruptionConfig()
    objective = build(cfg)
    raw, target_len = span_corruption_lengths(seq_len, cfg.noise_density, cfg.mean_span_length)
    assert objective.raw_length(seq_len) == raw
    noise = spans = total = 0
    for index in range(1000):
        tokens, documents = window(np.random.default_rng([5, index]), raw)
        out = objective(tokens, documents, np.random.default_rng([6, index]))
        check_shapes(objective, out, seq_len)
        assert out["input_ids"].shape == (seq_len,) and out["padding_mask"].all()  # full
        assert out["labels"].shape == (target_len,) and out["decoder_padding_mask"].all()
        inputs, targets = unpack(out)
        n_spans = int(np.isin(inputs, SENTINELS).sum())
        assert inputs[np.isin(inputs, SENTINELS)].tolist() == list(range(5, 5 + n_spans))
        assert targets[np.isin(targets, SENTINELS)].tolist() == list(range(5, 5 + n_spans))
        assert np.array_equal(reconstruct(inputs, targets), tokens)
        assert out["decoder_input_ids"][0] == PAD
        assert np.array_equal(out["decoder_input_ids"][1:], out["labels"][:-1])
        noise += len(targets) - n_spans - 1
        spans += n_spans
        total += raw
    assert abs(noise / total - cfg.noise_density) < 0.01
    assert abs(noise / spans - cfg.mean_span_length) < 0.3


def test_span_corruption_pads_a_short_window() -> None:
    objective = build(SpanCorruptionConfig())
    raw = objective.raw_length(128)
    for index in range(200):
        rng = np.random.default_rng([7, index])
        tokens, documents = window(rng, raw)
        real = int(rng.integers(0, raw))
        tokens[real:] = PAD  # a short last window, padded by the loader
        out = objective(tokens, documents, np.random.default_rng(index))
        check_shapes(objective, out, 128)
        inputs, targets = unpack(out)
        assert np.array_equal(reconstruct(inputs, targets), tokens[:real])
        assert (out["input_ids"][~out["padding_mask"]] == PAD).all()
        assert (out["labels"][~out["decoder_padding_mask"]] == -100).all()


def test_too_few_sentinels_is_an_error_naming_the_setting() -> None:
    few = SpecialIds(sentinels=tuple(range(5, 15)))
    objective = build(SpanCorruptionConfig(), special=few)
    assert objective.raw_length(128) > 0  # 9 spans fit in 10 sentinels
    with pytest.raises(ValueError, match=r"tokenizer\.n_sentinels"):
        objective.raw_length(512)  # 28 spans
    raw = span_corruption_lengths(512, 0.15, 3.0)[0]
    tokens, documents = window(np.random.default_rng(0), raw)
    with pytest.raises(ValueError, match=r"tokenizer\.n_sentinels"):
        objective(tokens, documents, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"tokenizer\.n_sentinels"):
        build(UL2Config(), special=few).raw_length(512)


# -- UL2 ------------------------------------------------------------------------------------


def test_ul2_denoiser_mix_shapes_and_reconstruction() -> None:
    cfg = UL2Config()
    objective = build(cfg)
    assert isinstance(objective, UL2)
    seq_len = 256
    raw = objective.raw_length(seq_len)
    r_raw = span_corruption_lengths(seq_len, cfg.r_noise_density, cfg.r_mean_span_length)[0]
    x_raw = span_corruption_lengths(seq_len, cfg.x_noise_density, cfg.x_mean_span_length)[0]
    s_raw = prefix_lm_lengths(seq_len)[0]
    assert raw == max(r_raw, x_raw, s_raw)
    fake_cfg = SimpleNamespace(objective=cfg, data=SimpleNamespace(seq_len=seq_len))
    assert encoder_decoder_lengths(fake_cfg) == (seq_len, objective.target_length(seq_len))
    counts = {"R": 0, "S": 0, "X": 0}
    n = 3000
    for index in range(n):
        tokens, documents = window(np.random.default_rng([8, index]), raw)
        mode = objective.choose(np.random.default_rng([9, index]))  # the sample's first draw
        out = objective(tokens, documents, np.random.default_rng([9, index]))
        check_shapes(objective, out, seq_len)
        assert out["padding_mask"].all()  # every denoiser fills the encoder
        inputs, targets = unpack(out)
        has_sentinels = np.isin(inputs, SENTINELS).any()
        if mode == "S":
            assert not has_sentinels
            suffix = len(targets) - 1
            assert 1 <= suffix <= seq_len // 4 and targets[-1] == EOS
            assert np.array_equal(
                np.concatenate([inputs[:-1], targets[:-1]]), tokens[: seq_len - 1 + suffix]
            )
        else:
            assert has_sentinels
            prefix = r_raw if mode == "R" else x_raw
            assert np.array_equal(reconstruct(inputs, targets), tokens[:prefix])
        counts[mode] += 1
    weights = {"R": cfg.r_weight, "S": cfg.s_weight, "X": cfg.x_weight}
    for mode, weight in weights.items():
        assert abs(counts[mode] / n - weight / sum(weights.values())) < 0.03, counts


def test_ul2_disabled_denoisers_are_never_chosen_nor_sized() -> None:
    cfg = UL2Config(r_weight=1.0, s_weight=0.0, x_weight=0.0)
    objective = build(cfg)
    assert objective.raw_length(256) == span_corruption_lengths(256, 0.15, 3.0)[0]
    assert objective.output_shapes(256)["labels"] == (span_corruption_lengths(256, 0.15, 3.0)[1],)
    assert {objective.choose(np.random.default_rng(i)) for i in range(50)} == {"R"}


def test_seq_len_is_recovered_from_the_window_length() -> None:
    for cfg in (CausalLMConfig(), MaskedLMConfig(), SpanCorruptionConfig(), UL2Config()):
        objective = build(cfg)
        for seq_len in range(16, 700, 13):
            assert objective.seq_len_for(objective.raw_length(seq_len)) == seq_len


# -- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        CausalLMConfig(),
        MaskedLMConfig(),
        MaskedLMConfig(whole_word=True),
        SpanCorruptionConfig(),
        UL2Config(),
    ],
    ids=["clm", "mlm", "mlm-wwm", "span", "ul2"],
)
def test_same_seed_same_sample(cfg) -> None:
    objective = build(cfg, word_start=np.arange(VOCAB) % 2 == 0)
    tokens, documents = window(np.random.default_rng(0), objective.raw_length(256))
    for seed in range(20):
        first = objective(tokens, documents, np.random.default_rng([seed, 1]))
        second = objective(tokens.copy(), documents.copy(), np.random.default_rng([seed, 1]))
        assert first.keys() == second.keys()
        for key in first:
            assert np.array_equal(first[key], second[key]), key
    if objective.uses_rng:
        a = objective(tokens, documents, np.random.default_rng(1))
        b = objective(tokens, documents, np.random.default_rng(2))
        assert not all(np.array_equal(a[key], b[key]) for key in a)


def test_build_objective_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mask_prob"):
        build(MaskedLMConfig(mask_prob=0.0))
    with pytest.raises(ValueError, match="noise_density"):
        build(SpanCorruptionConfig(noise_density=1.0))
    with pytest.raises(ValueError, match="x_mean_span_length"):
        build(UL2Config(x_mean_span_length=0.5))
    with pytest.raises(ValueError, match="all 0"):
        build(UL2Config(r_weight=0, s_weight=0, x_weight=0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_objective(
            CausalLMConfig(), SPECIAL, 50, document_masking=True, reset_position_ids=True
        )


@pytest.mark.parametrize("seq_len", [16, 64, 200])
def test_every_short_window_fits_the_fixed_shapes(seq_len: int) -> None:
    objective = build(UL2Config())
    assert isinstance(objective, UL2)
    target_len = objective.target_length(seq_len)
    for name, denoiser in objective.denoisers.items():
        tokens, _ = window(np.random.default_rng(seq_len), denoiser.raw_length(seq_len))
        for n in range(len(tokens) + 1):
            out = denoiser.sample(tokens[:n], seq_len, target_len, np.random.default_rng(n))
            inputs, targets = unpack(out)
            assert len(inputs) <= seq_len and len(targets) <= target_len
            if name == "S":  # a prefix of up to seq_len - 1 tokens and the suffix after it
                restored = np.concatenate([inputs[:-1], targets[:-1]])
                used = min(n, seq_len - 1 + len(targets) - 1)
            else:
                restored, used = reconstruct(inputs, targets), n
            assert np.array_equal(restored, tokens[:used]), (name, n)
