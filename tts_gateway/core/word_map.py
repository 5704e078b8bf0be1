"""Word timings name the words of the input, not the words the engine was given.

The text front end rewrites text before an engine speaks it ("Dr." → "Doctor", "$42" → "forty-two
dollars", an SSML ``<sub>`` → its alias), and engines time the words they speak. `WordMap` aligns the
spoken words with the written ones once per request: each written word is first expanded the way the
front end would say it alone (its lexicon respelling, its normalized form), then the two word sequences
are aligned on those forms, so identical words anchor the alignment and the words between two anchors
map run to run. A written word spoken as several ("42") is one entry spanning all of them; written words
the alignment gives no spoken word of their own (read together with a neighbour, like "3:30 pm") share
their group's span, split in order in proportion to their length.

`WordReader` applies the map to a stream of spoken word timings: a written word comes out once the last
spoken word of its group has been heard, so streamed timings may lag a word or two behind their audio.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

from tts_gateway.engines.timing import InputWord, WordTiming, input_words

_NOT_WORD = regex.compile(r"[\W_]+")


def _key(word: str) -> str:
    """What two words must share to be the same word: case, punctuation and hyphens aside."""
    return _NOT_WORD.sub("", word).casefold()


@dataclass(frozen=True)
class Group:
    """Written words ``[first, end)`` heard as spoken words ``[spoken_first, spoken_end)`` (request-wide)."""

    first: int
    end: int
    spoken_first: int
    spoken_end: int


@dataclass(frozen=True)
class WordMap:
    """How the spoken words of a request's pieces map back to the words of its text as written.

    Attributes:
        written: The input's words (`timing.input_words` of the text as written).
        groups: In order; together they hold every written and every spoken word once.
        piece_ends: Per piece, the request-wide index one past its last spoken word.
        sentences: Per piece, the input's text it speaks ("" for a piece whose words all belong to
            a written word begun in the piece before).
    """

    written: tuple[str, ...]
    groups: tuple[Group, ...]
    piece_ends: tuple[int, ...]
    sentences: tuple[str, ...]

    def reader(self) -> WordReader:
        return WordReader(self)


def build_word_map(written_text: str, pieces: Sequence[str], expand: Callable[[str], str]) -> WordMap:
    """Align the words of ``pieces`` (as engines name them) with the words of ``written_text``.

    Args:
        written_text: The text as the client wrote it (an SSML document's text content).
        pieces: What the engine is given, piece by piece.
        expand: A written word as the front end says it alone (respelled, normalized).
    """
    written = input_words(written_text)
    spoken: list[str] = []
    piece_ends: list[int] = []
    for piece in pieces:
        spoken.extend(word.text for word in input_words(piece))
        piece_ends.append(len(spoken))
    expanded: dict[str, list[str]] = {}
    reference: list[tuple[str, int]] = []
    for index, word in enumerate(written):
        forms = expanded.get(word.text)
        if forms is None:
            forms = [key for key in (_key(w.text) for w in input_words(expand(word.text))) if key] or [_key(word.text)]
            expanded[word.text] = forms
        reference.extend((form, index) for form in forms)
    labels = _label(reference, [_key(word) for word in spoken], len(written))
    groups = _groups(labels, len(written))
    return WordMap(tuple(w.text for w in written), tuple(groups), tuple(piece_ends),
                   _sentences(written_text, written, groups, piece_ends))


# How far apart (in words, on either side) the alignment looks for the next pair of words the two sides
# share after they part; beyond it, the rest is aligned as a whole (difflib, quadratic in the worst case).
_RESYNC_WORDS = 16


def _label(reference: list[tuple[str, int]], spoken: list[str], count: int) -> list[int]:
    """The written word each spoken word belongs to: never decreasing.

    The sides are walked together while their words agree; where they part, the nearest pair of agreeing
    words (confirmed by the word after) ends the run that differs, so the cost stays linear in the text.
    """
    if not spoken or not count:
        return [0] * len(spoken)
    forms = [form for form, _ in reference]
    owners = [owner for _, owner in reference]
    labels: list[int | None] = [None] * len(spoken)
    i = j = 0
    while i < len(forms) and j < len(spoken):
        if forms[i] == spoken[j]:
            labels[j] = owners[i]
            i, j = i + 1, j + 1
            continue
        found = _resync(forms, spoken, i, j)
        if found is None:
            matcher = difflib.SequenceMatcher(None, forms[i:], spoken[j:], autojunk=False)
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag in ("equal", "replace"):
                    _share(labels, owners, i + i1, i + i2, j + j1, j + j2)
            break
        _share(labels, owners, i, i + found[0], j, j + found[1])
        i, j = i + found[0], j + found[1]
    # A spoken word the written ones lack belongs to the word before it (at the start: the one after).
    known = [label for label in labels if label is not None]
    last = known[0] if known else 0
    out = []
    for label in labels:
        last = max(last, label) if label is not None else last
        out.append(last)
    return out


def _resync(forms: list[str], spoken: list[str], i: int, j: int) -> tuple[int, int] | None:
    """The fewest words to skip on each side (written, spoken) to where they agree again, or None."""
    for total in range(1, 2 * _RESYNC_WORDS + 1):
        for skip in range(max(0, total - _RESYNC_WORDS), min(total, _RESYNC_WORDS) + 1):
            a, b = i + skip, j + total - skip
            if a < len(forms) and b < len(spoken) and forms[a] == spoken[b] and \
                    (a + 1 == len(forms) or b + 1 == len(spoken) or forms[a + 1] == spoken[b + 1]):
                return skip, total - skip
    return None


def _share(labels: list[int | None], owners: list[int], i1: int, i2: int, j1: int, j2: int) -> None:
    """Spoken words ``[j1, j2)`` said for written forms ``[i1, i2)``: in order, in proportion."""
    if i1 == i2:
        return
    for j in range(j1, j2):
        labels[j] = owners[i1 + (j - j1) * (i2 - i1) // (j2 - j1)]


def _groups(labels: list[int], count: int) -> list[Group]:
    """Written words with spoken words of their own start a group; the ones without join the group before
    (the first group also takes the written words before it)."""
    if not count:
        return []
    if not labels:
        return [Group(0, count, 0, 0)]
    starts = sorted(set(labels))
    groups = []
    spoken_first = 0
    for number, label in enumerate(starts):
        first = 0 if number == 0 else label
        end = starts[number + 1] if number + 1 < len(starts) else count
        spoken_end = spoken_first
        while spoken_end < len(labels) and labels[spoken_end] == label:
            spoken_end += 1
        groups.append(Group(first, end, spoken_first, spoken_end))
        spoken_first = spoken_end
    return groups


def _sentences(text: str, written: Sequence[InputWord], groups: list[Group],
               piece_ends: Sequence[int]) -> tuple[str, ...]:
    """Each piece's stretch of the written text: from its first group's first word to the next piece's."""
    begins: list[int | None] = []
    group = 0
    spoken_first = 0
    for spoken_end in piece_ends:
        begin = None
        while group < len(groups) and groups[group].spoken_first < spoken_end:
            if groups[group].spoken_first >= spoken_first and begin is None:
                begin = 0 if group == 0 else written[groups[group].first].start
            group += 1
        begins.append(begin)
        spoken_first = spoken_end
    if begins and begins[0] is None:
        begins[0] = 0
    sentences = []
    for index, begin in enumerate(begins):
        if begin is None:
            sentences.append("")
            continue
        end = next((b for b in begins[index + 1:] if b is not None), len(text))
        sentences.append(" ".join(text[begin:end].split()))
    return tuple(sentences)


class WordReader:
    """Spoken word timings in, the input's word timings out, in order (one request's run)."""

    def __init__(self, words: WordMap) -> None:
        self.map = words
        self.heard: list[WordTiming] = []
        self.group = 0  # the first group not given out yet
        self.last = 0.0  # the end of the latest word heard

    def feed(self, spoken: Sequence[WordTiming]) -> tuple[WordTiming, ...]:
        """The written words whose spoken words have now all been heard."""
        self.heard.extend(spoken)
        if spoken:
            self.last = max(self.last, spoken[-1].end)
        out: list[WordTiming] = []
        groups = self.map.groups
        while self.group < len(groups) and groups[self.group].spoken_end <= len(self.heard):
            out.extend(self._give(groups[self.group]))
            self.group += 1
        return tuple(out)

    def end_piece(self, index: int) -> tuple[WordTiming, ...]:
        """At the end of piece ``index``: its words come out, the ones the engine did not report too."""
        ends = self.map.piece_ends
        end = ends[index] if index < len(ends) else len(self.heard)
        # An engine that reported another count of words than the piece has: its next piece starts in step.
        del self.heard[end:]
        self.heard.extend(WordTiming("", self.last, self.last) for _ in range(end - len(self.heard)))
        return self.feed(())

    def finish(self) -> tuple[WordTiming, ...]:
        """Every written word not given out yet (the end of the request)."""
        out: list[WordTiming] = list(self.feed(()))
        while self.group < len(self.map.groups):
            out.extend(self._give(self.map.groups[self.group]))
            self.group += 1
        return tuple(out)

    def _give(self, group: Group) -> list[WordTiming]:
        heard = self.heard[group.spoken_first:group.spoken_end]
        start = heard[0].start if heard else self.last
        end = max(w.end for w in heard) if heard else self.last
        self.last = max(self.last, end)
        names = self.map.written[group.first:group.end]
        if len(names) == 1:
            return [WordTiming(names[0], start, end)]
        if len(names) == len(heard):
            return [WordTiming(name, word.start, word.end) for name, word in zip(names, heard, strict=True)]
        # Written words read together share their span, in order, in proportion to their length.
        total = sum(len(name) for name in names)
        out = []
        at = start
        for name in names:
            step = (end - start) * len(name) / total
            out.append(WordTiming(name, at, at + step))
            at += step
        return out
