"""Text normalisation and sentence splitting for long text.

Sentences come from pysbd (a maintained rule-based segmenter with rules for en, es, fr, de, it,
pl, ru, nl, ar, zh, ja and more); languages it lacks (pt, tr, cs, hu, ko …) use its English
rules, which handle Latin punctuation. Pieces longer than the engine's limit are cut at clause
punctuation, then at spaces, then hard (zh/ja have no spaces).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from functools import lru_cache

import pysbd
import pysbd.languages
import regex

_CLAUSE_RE = re.compile(r"(?<=[,;:，、；：])\s*")
_SPACE_RE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """NFC-normalise and fold runs of white space (used for splitting and cache keys)."""
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()


_GRAPHEME_RE = regex.compile(r"\X")


def char_count(text: str) -> int:
    """Length in user-perceived characters (grapheme clusters): an emoji with its modifiers or a
    letter with combining marks counts once, whatever its code points."""
    return len(_GRAPHEME_RE.findall(unicodedata.normalize("NFC", text)))


# Combining marks stacked on one base character. Real scripts stay far below this (Vietnamese and
# Indic text use up to ~4); long runs make Unicode normalisation quadratic.
MAX_COMBINING_RUN = 16
_COMBINING_RUN_RE = regex.compile(r"\p{M}{" + str(MAX_COMBINING_RUN + 1) + ",}")
# Symbols and emoji are read out by name ("family: man, woman, girl, boy"); this is about as long.
SYMBOL_SPOKEN_CHARS = 25


def longest_combining_run(text: str) -> int:
    """Length of the longest run of combining marks (linear time)."""
    return max((len(m.group()) for m in _COMBINING_RUN_RE.finditer(text)), default=0)


def spoken_length(text: str) -> int:
    """About how many characters an engine will speak: graphemes, with each symbol or emoji cluster
    counted as the length of its name. Call only on text whose combining runs are bounded."""
    clusters = _GRAPHEME_RE.findall(unicodedata.normalize("NFC", text))
    symbols = sum(1 for c in clusters if any(unicodedata.category(ch) in ("So", "Sk") for ch in c))
    return len(clusters) + symbols * (SYMBOL_SPOKEN_CHARS - 1)


def has_speakable(text: str) -> bool:
    """Whether there is anything to say: a letter, digit or symbol (not only spaces, marks or
    invisible format characters)."""
    return any(unicodedata.category(ch)[0] in "LNS" for ch in text)


def has_control_chars(text: str) -> bool:
    """Control characters other than tab and newlines (they crash phonemisers or hide text)."""
    return any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\r" for ch in text)


_SEGMENT_LOCK = threading.Lock()  # pysbd segmenters keep state per call: not thread-safe


@lru_cache(maxsize=64)
def _segmenter(language: str) -> pysbd.Segmenter:
    base = language.split("-")[0].lower()
    code = base if base in pysbd.languages.LANGUAGE_CODES else "en"
    return pysbd.Segmenter(language=code, clean=False)


def split_sentences(text: str, language: str, max_chars: int) -> list[str]:
    """Split ``text`` into sentence-sized pieces no longer than ``max_chars`` characters."""
    text = normalise(text)
    if not text:
        return []
    pieces: list[str] = []
    with _SEGMENT_LOCK:
        sentences = list(_segmenter(language).segment(text))
    for sentence in sentences:
        sentence = sentence.strip()
        if sentence:
            pieces.extend(_fit(sentence, max_chars))
    return pieces


def _fit(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    out: list[str] = []
    for clause in _pack(_CLAUSE_RE.split(sentence), max_chars, " "):
        if len(clause) <= max_chars:
            out.append(clause)
            continue
        for words in _pack(clause.split(" "), max_chars, " "):
            # No spaces to cut at (zh/ja, or one huge token): cut hard.
            out.extend(words[i : i + max_chars] for i in range(0, len(words), max_chars))
    return [piece.strip() for piece in out if piece.strip()]


def _pack(parts: list[str], max_chars: int, joiner: str) -> list[str]:
    """Greedily join consecutive parts while they fit."""
    packed: list[str] = []
    current = ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        candidate = f"{current}{joiner}{part}" if current else part
        if len(candidate) <= max_chars:
            current = candidate
        else:
            if current:
                packed.append(current)
            current = part
    if current:
        packed.append(current)
    return packed
