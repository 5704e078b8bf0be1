"""Word timings: what a timed engine reports with its audio, and how its units map back to the input's words.

An engine that implements `base.TimingEngine` yields `TimedChunk`s: audio plus the words heard in it,
in seconds from the chunk's first sample. Words are the input's own (`input_words`: white-space
separated, outer punctuation dropped), so "42" is one entry however many words the engine speaks for it.
Engines measure words with their own units — phonemes with predicted durations (Piper, Kokoro), word
events (espeak-ng) — and the helpers here turn those into per-word spans.
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import regex

WORD = "word"
SENTENCE = "sentence"

_TOKEN_RE = regex.compile(r"\S+")
_OUTER_PUNCT_RE = regex.compile(r"^\p{P}+|\p{P}+$")
# Marks that modify a neighbouring phoneme rather than being one (stress, length, tie).
_MODIFIERS = frozenset("ˈˌːˑ‿͡")


@dataclass(frozen=True)
class WordTiming:
    """A word (or sentence) of the input and when it is heard, in seconds."""

    text: str
    start: float
    end: float

    def shifted(self, offset: float, scale: float = 1.0) -> WordTiming:
        return WordTiming(self.text, offset + self.start * scale, offset + self.end * scale)


@dataclass(frozen=True)
class TimedChunk:
    """Audio (float32 mono at the engine's rate) and the words heard in it, from its first sample."""

    audio: np.ndarray
    words: tuple[WordTiming, ...] = ()


@dataclass(frozen=True)
class InputWord:
    text: str  # without outer punctuation
    start: int  # character span of the token as written (punctuation included)
    end: int


def input_words(text: str) -> list[InputWord]:
    """The words of ``text`` as timings name them: white-space separated tokens without their outer
    punctuation; a token of punctuation only ("—", "...") is no word."""
    words = []
    for match in _TOKEN_RE.finditer(text):
        bare = _OUTER_PUNCT_RE.sub("", match.group())
        if bare:
            words.append(InputWord(bare, match.start(), match.end()))
    return words


def _is_sound(phoneme: str) -> bool:
    return any(unicodedata.category(ch)[0] == "L" for ch in phoneme) and not set(phoneme) <= _MODIFIERS


def _is_separator(phoneme: str) -> bool:
    return not phoneme.strip() or all(unicodedata.category(ch)[0] in "PZ" for ch in phoneme)


def label_phonemes(alone: Sequence[Sequence[str]], spoken: Sequence[str]) -> list[int | None]:
    """Which word each phoneme of ``spoken`` belongs to (None: a space or punctuation).

    ``alone[i]``: word i's phonemes when phonemized by itself; ``spoken``: the phonemes of the whole
    text, where the phonemizer may join words ("in the" → one word) or read one as several ("42").
    The two sequences are aligned sound by sound, so every sound takes the word it came from; the
    labels never go back (words stay in order). With one word there is nothing to align: ``alone``
    may then be ``[[]]`` (callers skip phonemizing it).
    """
    if len(alone) == 1:
        return [None if _is_separator(phoneme) else 0 for phoneme in spoken]
    reference = [(phoneme, index) for index, phonemes in enumerate(alone) for phoneme in phonemes
                 if _is_sound(phoneme)]
    sounds = [position for position, phoneme in enumerate(spoken) if _is_sound(phoneme)]
    labels: list[int | None] = [None] * len(spoken)
    matcher = difflib.SequenceMatcher(None, [p for p, _ in reference], [spoken[k] for k in sounds], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace"):
            for j in range(j1, j2):
                labels[sounds[j]] = reference[i1 + (j - j1) * (i2 - i1) // (j2 - j1)][1]
    # Sounds the words alone lack take their neighbour's word; then labels only move forward.
    last: int | None = None
    for position in sounds:
        if labels[position] is None:
            labels[position] = last
        last = labels[position]
    nxt: int | None = None
    for position in reversed(sounds):
        if labels[position] is None:
            labels[position] = nxt
        nxt = labels[position]
    highest = -1
    for position in sounds:
        label = labels[position]
        if label is not None:
            highest = max(highest, label)
            labels[position] = highest
    # Stress and length marks belong to the sound they mark, within the same spoken word.
    for position, phoneme in enumerate(spoken):
        if _is_sound(phoneme) or _is_separator(phoneme):
            continue
        labels[position] = _neighbour_label(spoken, labels, position)
    return labels


def _neighbour_label(spoken: Sequence[str], labels: list[int | None], position: int) -> int | None:
    for step in (1, -1):
        k = position + step
        while 0 <= k < len(spoken) and not _is_separator(spoken[k]):
            if _is_sound(spoken[k]):
                return labels[k]
            k += step
    return None


class WordClock:
    """Turns labelled units with durations into word timings, chunk by chunk, for one piece of text.

    Every word of the piece is reported once, in order: a word with no unit of its own (joined into
    its neighbour by the engine) shares the span of the word it was joined to; the units after a
    chunk's last word (its closing punctuation and silence) count as that word's, so a piece's last
    word ends with its audio.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self.next = 0  # the first word not reported yet

    def chunk(self, labels: Sequence[int | None], samples: Sequence[int], rate: int, last: bool) -> list[WordTiming]:
        """The words of one chunk. ``labels[k]``: unit k's word (None: no word's); ``samples[k]``: its
        length in samples; ``last``: no chunk of this piece follows."""
        edges = np.concatenate([[0], np.cumsum(np.asarray(samples, dtype=np.int64))])
        spans: dict[int, list[int]] = {}
        for k, label in enumerate(labels):
            if label is None or label < self.next:
                continue
            span = spans.setdefault(label, [int(edges[k]), int(edges[k + 1])])
            span[1] = int(edges[k + 1])
        found = sorted(spans)
        timings: list[WordTiming] = []
        previous: list[int] | None = None
        for label in found:
            start, end = spans[label]
            # Words the engine joined into this one (or into the previous) share its span.
            for skipped in range(self.next, label):
                shared = previous or [start, end]
                timings.append(WordTiming(self.words[skipped], shared[0] / rate, shared[1] / rate))
            timings.append(WordTiming(self.words[label], start / rate, end / rate))
            previous = [start, end]
            self.next = label + 1
        total = int(edges[-1])
        if last:
            tail = previous or [total, total]
            for skipped in range(self.next, len(self.words)):
                timings.append(WordTiming(self.words[skipped], tail[0] / rate, tail[1] / rate))
            self.next = len(self.words)
        if timings:
            end_word = timings[-1]
            closing = [t for t in timings if t.end == end_word.end]
            timings = [t for t in timings if t.end != end_word.end] + [
                WordTiming(t.text, t.start, total / rate) for t in closing]
        return timings


def scaled(words: Sequence[WordTiming], scale: float) -> tuple[WordTiming, ...]:
    """``words`` of audio whose length was multiplied by ``scale`` (a time stretch)."""
    return tuple(word.shifted(0.0, scale) for word in words)
