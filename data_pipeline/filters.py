"""Text normalisation and document quality filters, in the spirit of the Gopher and C4 rules.

Plain Python, no Ray: the pipeline calls `normalize` and `apply_filters` inside its Ray tasks.
Both are pure functions of the text and a small config dataclass, so the same input always
gives the same output on any worker.

"Words" are whitespace-separated tokens (`str.split()`) and "lines" are `\\n`-separated lines
with surrounding whitespace ignored; blank lines are not counted. The defaults are chosen so
that ordinary Python source files (the default corpus is the standard library) pass: code has
many symbols, short tokens, braces and lines such as `pass` or `return None` that repeat. The
rules that real code breaks (curly brackets, non-alphabetic words, mean word length, lorem
ipsum) are off by default; the length and repetition rules are on with generous thresholds that
only catch degenerate files (a block pasted hundreds of times, a one-liner, a data dump). The
comment on each threshold gives the Gopher (Rae et al. 2021) or C4 (Raffel et al. 2020) value
to use for natural-language web text.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cached_property
from types import ModuleType

from pretrain.config import FilterConfig, NormalizeConfig

# --------------------------------------------------------------------------------------------
# normalisation


MAX_BLANK_LINES = 2  # PEP 8 separates top-level definitions with two blank lines
_BLANK_RUN = re.compile(rf"\n{{{MAX_BLANK_LINES + 2},}}")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    """Normalise one document's text.

    Args:
        text: The raw document text.
        cfg: Which normalisations to apply (ftfy fixes first, then NFC, then whitespace).

    Returns:
        The normalised text. With `cfg.whitespace` it has no trailing newline.

    Raises:
        ImportError: `cfg.fix_text` is on and ftfy is not installed.
    """
    if cfg.fix_text:
        text = _load_ftfy().fix_text(text)
    if cfg.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if cfg.whitespace:
        text = normalize_whitespace(text)
    return text


def normalize_whitespace(text: str) -> str:
    """Unify line ends, strip trailing spaces and blank-line runs; keep indentation."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Per line rather than one regex: a `\s+$` pattern is quadratic on long runs of inner spaces.
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUN.sub("\n" * (MAX_BLANK_LINES + 1), text).strip("\n")


def _load_ftfy() -> ModuleType:
    try:
        import ftfy
    except ImportError as error:
        raise ImportError(
            "normalize.fix_text=true needs the ftfy package, which is not installed: "
            "pip install ftfy (or set normalize.fix_text=false)"
        ) from error
    return ftfy


# --------------------------------------------------------------------------------------------
# quality filters


# Every reason `apply_filters` can return, in the order the rules run (cheap rules first), so
# the pipeline can report a zero count for rules that dropped nothing.
FILTER_NAMES: tuple[str, ...] = (
    "lorem_ipsum",
    "curly_bracket",
    "min_words",
    "max_words",
    "min_mean_word_length",
    "max_mean_word_length",
    "max_symbol_word_ratio",
    "max_non_alpha_word_fraction",
    "max_bullet_line_fraction",
    "max_ellipsis_line_fraction",
    "max_duplicate_line_fraction",
    "max_duplicate_line_char_fraction",
    "max_top_ngram_char_fraction",
    "max_dup_ngram_char_fraction",
)

# n -> how much lower than the configured threshold the n-gram threshold is (Gopher's steps).
_TOP_NGRAM_OFFSETS = {2: 0.0, 3: 0.02, 4: 0.04}
_DUP_NGRAM_OFFSETS = {5: 0.0, 6: 0.01, 7: 0.02, 8: 0.03, 9: 0.04, 10: 0.05}
_BULLETS = ("•", "●", "○", "◦", "▪", "‣", "⁃", "-", "*")
_ELLIPSES = ("...", "…")
_HASH_RUN = re.compile(r"#+")  # a "#####" banner line is one symbol, not five
_ELLIPSIS_RUN = re.compile(r"\.{3,}|…+")
_ALPHA = re.compile(r"[^\W\d_]")  # one letter, in any script
_LOREM_IPSUM = re.compile(r"lorem\s+ipsum", re.IGNORECASE)


class _Document:
    """A document split once into words and lines; the statistics the rules share."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.split()
        self.lines = [stripped for line in text.split("\n") if (stripped := line.strip())]
        self.word_lengths = [len(word) for word in self.words]
        self.word_chars = sum(self.word_lengths)

    @cached_property
    def word_ids(self) -> list[int]:
        """Words as small ints, so n-gram tuples hash and compare quickly."""
        vocabulary: dict[str, int] = {}
        return [vocabulary.setdefault(word, len(vocabulary)) for word in self.words]

    def ngrams(self, n: int) -> list[tuple[int, ...]]:
        """The n-grams of word ids, one per start position."""
        return list(zip(*(self.word_ids[i:] for i in range(n)), strict=False))

    def duplicate_lines(self) -> tuple[float, float]:
        """Share of lines, and of line characters, in lines that repeat an earlier line."""
        if not self.lines:
            return 0.0, 0.0
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in self.lines:
            if line in seen:
                dup_lines += 1
                dup_chars += len(line)
            else:
                seen.add(line)
        return dup_lines / len(self.lines), dup_chars / sum(map(len, self.lines))


def _covered_chars(starts: Sequence[int], n: int, word_lengths: Sequence[int]) -> int:
    """Characters of the words covered by n-grams starting at `starts` (sorted), counted once."""
    covered, end = 0, 0
    for start in starts:
        first = max(start, end)
        end = start + n
        covered += sum(word_lengths[first:end])
    return covered


def _top_ngram_exceeds(doc: _Document, threshold: float) -> bool:
    for n, offset in _TOP_NGRAM_OFFSETS.items():
        ngrams = doc.ngrams(n)
        if not ngrams:
            break
        # Ties go to the n-gram seen first in the text (Counter keeps insertion order).
        top, count = Counter(ngrams).most_common(1)[0]
        if count < 2:
            break  # nothing repeats at n, so nothing repeats at n + 1 either
        starts = [i for i, ngram in enumerate(ngrams) if ngram == top]
        if _covered_chars(starts, n, doc.word_lengths) / doc.word_chars > threshold - offset:
            return True
    return False


def _dup_ngram_exceeds(doc: _Document, threshold: float) -> bool:
    lowest = threshold - max(_DUP_NGRAM_OFFSETS.values())
    for n, offset in _DUP_NGRAM_OFFSETS.items():
        ngrams = doc.ngrams(n)
        counts = Counter(ngrams)
        starts = [i for i, ngram in enumerate(ngrams) if counts[ngram] > 1]
        fraction = _covered_chars(starts, n, doc.word_lengths) / doc.word_chars
        if fraction > threshold - offset:
            return True
        # The words inside repeated (n+1)-grams are a subset of those inside repeated n-grams,
        # so once the fraction is below every remaining threshold no larger n can exceed one.
        if fraction <= lowest:
            break
    return False


def _symbol_word_ratio(doc: _Document) -> float:
    hashes = len(_HASH_RUN.findall(doc.text))
    ellipses = len(_ELLIPSIS_RUN.findall(doc.text))
    return max(hashes, ellipses) / len(doc.words)


def _non_alpha_word_fraction(doc: _Document) -> float:
    return sum(1 for word in doc.words if not _ALPHA.search(word)) / len(doc.words)


def _line_fraction(doc: _Document, accept: Callable[[str], bool]) -> float:
    return sum(1 for line in doc.lines if accept(line)) / len(doc.lines) if doc.lines else 0.0


def apply_filters(text: str, cfg: FilterConfig) -> str | None:
    """Run the enabled quality rules on one (normalised) document.

    Args:
        text: The document text, normally the output of `normalize`.
        cfg: Which rules run, with their thresholds.

    Returns:
        None to keep the document, else the name of the first rule that drops it (one of
        `FILTER_NAMES`, which is also the name of its config field).
    """
    if cfg.lorem_ipsum and _LOREM_IPSUM.search(text):
        return "lorem_ipsum"
    if cfg.curly_bracket and "{" in text:
        return "curly_bracket"
    doc = _Document(text)
    n_words = len(doc.words)
    if cfg.min_words is not None and n_words < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        return "max_words"
    if n_words == 0:
        return None  # every rule below is a ratio over words or lines
    mean_length = doc.word_chars / n_words
    if cfg.min_mean_word_length is not None and mean_length < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if cfg.max_mean_word_length is not None and mean_length > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if (
        cfg.max_symbol_word_ratio is not None
        and _symbol_word_ratio(doc) > cfg.max_symbol_word_ratio
    ):
        return "max_symbol_word_ratio"
    if (
        cfg.max_non_alpha_word_fraction is not None
        and _non_alpha_word_fraction(doc) > cfg.max_non_alpha_word_fraction
    ):
        return "max_non_alpha_word_fraction"
    if (
        cfg.max_bullet_line_fraction is not None
        and _line_fraction(doc, lambda line: line.startswith(_BULLETS))
        > cfg.max_bullet_line_fraction
    ):
        return "max_bullet_line_fraction"
    if (
        cfg.max_ellipsis_line_fraction is not None
        and _line_fraction(doc, lambda line: line.endswith(_ELLIPSES))
        > cfg.max_ellipsis_line_fraction
    ):
        return "max_ellipsis_line_fraction"
    if (
        cfg.max_duplicate_line_fraction is not None
        or cfg.max_duplicate_line_char_fraction is not None
    ):
        line_fraction, char_fraction = doc.duplicate_lines()
        if (
            cfg.max_duplicate_line_fraction is not None
            and line_fraction > cfg.max_duplicate_line_fraction
        ):
            return "max_duplicate_line_fraction"
        if (
            cfg.max_duplicate_line_char_fraction is not None
            and char_fraction > cfg.max_duplicate_line_char_fraction
        ):
            return "max_duplicate_line_char_fraction"
    if cfg.max_top_ngram_char_fraction is not None and _top_ngram_exceeds(
        doc, cfg.max_top_ngram_char_fraction
    ):
        return "max_top_ngram_char_fraction"
    if cfg.max_dup_ngram_char_fraction is not None and _dup_ngram_exceeds(
        doc, cfg.max_dup_ngram_char_fraction
    ):
        return "max_dup_ngram_char_fraction"
    return None
