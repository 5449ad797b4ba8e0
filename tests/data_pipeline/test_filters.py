"""Normalisation and quality filters: each rule drops what it should, and the stdlib passes."""

from __future__ import annotations

import dataclasses
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from data_pipeline.filters import (
    FILTER_NAMES,
    FilterConfig,
    NormalizeConfig,
    apply_filters,
    normalize,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Every rule off; each test turns on the one it checks.
NO_RULES = FilterConfig(
    min_words=None,
    max_words=None,
    max_symbol_word_ratio=None,
    max_non_alpha_word_fraction=None,
    max_duplicate_line_fraction=None,
    max_duplicate_line_char_fraction=None,
    max_top_ngram_char_fraction=None,
    max_dup_ngram_char_fraction=None,
    min_mean_word_length=None,
    max_mean_word_length=None,
    max_bullet_line_fraction=None,
    max_ellipsis_line_fraction=None,
    lorem_ipsum=False,
    curly_bracket=False,
)
# The thresholds of the Gopher and C4 papers, for natural-language web text.
GOPHER = FilterConfig(
    min_words=50,
    max_words=100_000,
    max_symbol_word_ratio=0.1,
    max_non_alpha_word_fraction=0.2,
    max_duplicate_line_fraction=0.3,
    max_duplicate_line_char_fraction=0.2,
    max_top_ngram_char_fraction=0.2,
    max_dup_ngram_char_fraction=0.15,
    min_mean_word_length=3,
    max_mean_word_length=10,
    max_bullet_line_fraction=0.9,
    max_ellipsis_line_fraction=0.3,
    lorem_ipsum=True,
    curly_bracket=True,
)

PROSE = """\
The old lighthouse stood on a rocky point at the northern edge of the bay.
For nearly a century its keepers climbed the spiral stairs every evening to light the lamp.
Ships coming home through autumn storms looked for its beam before anything else on shore.
When the light was finally automated, the last keeper moved into a cottage in the village.
He kept a logbook of every vessel he had guided past the reef during his long career.
Visitors still ask to read it, and the museum displays a few pages behind glass each summer.
Local children learn about the building at school and draw pictures of waves breaking below it.
"""


def test_normalize_nfc_makes_composed_and_decomposed_equal() -> None:
    composed, decomposed = "caf\u00e9 cr\u00e8me", "cafe\u0301 cre\u0300me"
    assert composed != decomposed
    cfg = NormalizeConfig()
    assert normalize(composed, cfg) == normalize(decomposed, cfg) == composed
    assert normalize(decomposed, NormalizeConfig(nfc=False)) == decomposed


def test_normalize_whitespace_keeps_indentation() -> None:
    text = "\n\n  \ndef f(x):  \r\n    if x:\t\r\n        return 1\r\r\r\r\r\n    return 2   \n\n\n"
    expected = "def f(x):\n    if x:\n        return 1\n\n\n    return 2"
    assert normalize(text, NormalizeConfig()) == expected
    assert normalize(text, NormalizeConfig(whitespace=False)) == text
    # Two blank lines (PEP 8 between definitions) survive; a third is removed.
    assert normalize("a\n\n\nb\n\n\n\n\nc", NormalizeConfig()) == "a\n\n\nb\n\n\nc"
    # Only blank lines are trimmed at the ends: the first line keeps its indentation.
    assert normalize(" \n\n    x = 1\n  \n", NormalizeConfig()) == "    x = 1"


def test_fix_text_without_ftfy_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` fail
    assert normalize("caf\u00c3\u00a9", NormalizeConfig()) == "caf\u00c3\u00a9"  # off: not needed
    with pytest.raises(ImportError, match="pip install ftfy"):
        normalize("caf\u00c3\u00a9", NormalizeConfig(fix_text=True))


def test_fix_text_uses_ftfy_first(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(fix_text=lambda text: text.replace("\u00c3\u00a9", "e\u0301"))
    monkeypatch.setitem(sys.modules, "ftfy", fake)
    assert normalize("caf\u00c3\u00a9 \n", NormalizeConfig(fix_text=True)) == "caf\u00e9"


def test_filter_names_are_the_config_fields() -> None:
    assert set(FILTER_NAMES) == {field.name for field in dataclasses.fields(FilterConfig)}
    assert len(FILTER_NAMES) == len(set(FILTER_NAMES))


def test_good_prose_passes_gopher_and_default_rules() -> None:
    assert apply_filters(PROSE, GOPHER) is None
    assert apply_filters(PROSE, FilterConfig()) is None


def _lines(*lines: str) -> str:
    return "\n".join(lines)


REPEATED_LINE = (
    "Limited offer for readers of this page: buy two boxes of our finest green tea before the end "
    "of the month and we will send you a third box free of charge, with a teapot and six cups."
)
BAD_DOCUMENTS = {
    "min_words": "Far too short to be useful.",
    "max_words": PROSE + " word" * 100_001,
    "min_mean_word_length": " ".join(["a", "to", "be", "of", "in", "it"] * 20),
    "max_mean_word_length": " ".join(
        ["internationalization", "counterrevolutionary", "incomprehensibilities"] * 20
    ),
    "max_symbol_word_ratio": PROSE + " #news #today #sports #weather #deals" * 6,
    "max_non_alpha_word_fraction": PROSE + " ".join(str(i) for i in range(40)),
    "max_bullet_line_fraction": _lines(*(f"- item number {i} in a long list" for i in range(30))),
    "max_ellipsis_line_fraction": _lines(*(f"and then, story {i} went on..." for i in range(10))),
    "max_duplicate_line_fraction": _lines(*(["Subscribe now!"] * 10), *PROSE.splitlines()[:5]),
    # Few duplicate lines (1 of 6), but the duplicate is long: 26% of the characters.
    "max_duplicate_line_char_fraction": _lines(
        *PROSE.splitlines()[:4], REPEATED_LINE, REPEATED_LINE
    ),
    "max_top_ngram_char_fraction": PROSE + " the cat" * 40,
    "max_dup_ngram_char_fraction": PROSE + PROSE.splitlines()[0] + "\n" + PROSE.splitlines()[1],
    "lorem_ipsum": PROSE + "Lorem  IPSUM dolor sit amet, consectetur adipiscing elit.",
    "curly_bracket": PROSE + "var light = function() { return beam; };",
}


@pytest.mark.parametrize("rule", FILTER_NAMES)
def test_each_rule_drops_its_document_with_its_name(rule: str) -> None:
    """With only `rule` on, at its Gopher/C4 value, the crafted document is dropped by it."""
    cfg = dataclasses.replace(NO_RULES, **{rule: getattr(GOPHER, rule)})
    assert apply_filters(BAD_DOCUMENTS[rule], cfg) == rule
    assert apply_filters(PROSE, cfg) is None
    assert apply_filters(BAD_DOCUMENTS[rule], NO_RULES) is None


def test_duplicate_line_char_rule_catches_what_the_line_rule_misses() -> None:
    document = BAD_DOCUMENTS["max_duplicate_line_char_fraction"]
    assert apply_filters(document, GOPHER) == "max_duplicate_line_char_fraction"
    cfg = dataclasses.replace(
        GOPHER, max_duplicate_line_char_fraction=None, max_dup_ngram_char_fraction=None
    )
    assert apply_filters(document, cfg) is None  # 1 duplicate line of 6 < 0.3


def test_symbol_ratio_counts_ellipses_and_hash_runs() -> None:
    cfg = dataclasses.replace(NO_RULES, max_symbol_word_ratio=0.1)
    assert (
        apply_filters(PROSE + " wait..." * 10 + " what\u2026" * 10, cfg) == "max_symbol_word_ratio"
    )
    # A banner of 60 "#" is one symbol, like a single "#": 1 per ~150 words passes.
    assert apply_filters("#" * 60 + "\n" + PROSE, cfg) is None


def test_first_failing_rule_is_reported() -> None:
    """A short document full of braces is dropped by the cheaper, earlier rule."""
    assert apply_filters("x = {1: 2}", GOPHER) == "curly_bracket"
    assert (
        apply_filters("x = {1: 2}", dataclasses.replace(GOPHER, curly_bracket=False)) == "min_words"
    )


@pytest.mark.parametrize(
    "relative_path", ["os.py", "json/__init__.py", "collections/__init__.py", "ast.py"]
)
def test_stdlib_sources_pass_the_default_filters(relative_path: str) -> None:
    text = normalize((STDLIB / relative_path).read_text(encoding="utf-8"), NormalizeConfig())
    assert apply_filters(text, FilterConfig()) is None


def test_defaults_still_drop_a_pasted_block() -> None:
    block = (STDLIB / "json/__init__.py").read_text(encoding="utf-8").splitlines()[100:130]
    assert apply_filters("\n".join(block * 10), FilterConfig()) == "max_duplicate_line_fraction"
    spaced = "\n".join(block * 4)  # 75% duplicate lines: passes the line rule, not the n-grams
    assert apply_filters(spaced, FilterConfig()) == "max_dup_ngram_char_fraction"
