"""WebVTT and SRT captions from timings: one cue per sentence, or per short group of words when a
sentence is too long for two lines (and word timings exist)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from tts_gateway.engines.timing import WordTiming, input_words

CAPTION_FORMATS = ("vtt", "srt")
LINE_CHARS = 42  # the usual broadcast and streaming limit per caption line
CUE_LINES = 2


def cues(sentences: Sequence[WordTiming], words: Sequence[WordTiming]) -> list[WordTiming]:
    """The cues for ``sentences``: a sentence that fits in `CUE_LINES` lines is one cue; a longer one is
    cut into groups of its words that fit (each group's text as written, punctuation kept)."""
    found: list[WordTiming] = []
    remaining = list(words)
    for sentence in sentences:
        tokens = input_words(sentence.text)
        mine, remaining = remaining[:len(tokens)], remaining[len(tokens):]
        if _fits(sentence.text) or len(mine) != len(tokens) or not tokens:
            found.append(sentence)
            continue
        group: list[int] = []
        for index in range(len(tokens)):
            candidate = sentence.text[tokens[group[0]].start:tokens[index].end] if group else ""
            if group and not _fits(candidate):
                found.append(_group(sentence.text, tokens, mine, group))
                group = []
            group.append(index)
        if group:
            found.append(_group(sentence.text, tokens, mine, group))
    return found


def _fits(text: str) -> bool:
    return len(textwrap.wrap(text, LINE_CHARS)) <= CUE_LINES


def _group(text: str, tokens: Sequence, words: Sequence[WordTiming], group: list[int]) -> WordTiming:
    first, last = group[0], group[-1]
    return WordTiming(text[tokens[first].start:tokens[last].end], words[first].start, words[last].end)


def render(fmt: str, sentences: Sequence[WordTiming], words: Sequence[WordTiming] = ()) -> str:
    """Captions in ``fmt`` (``vtt`` or ``srt``) for the timings."""
    separator = "." if fmt == "vtt" else ","
    blocks = []
    for number, cue in enumerate(cues(sentences, words), start=1):
        lines = "\n".join(textwrap.wrap(cue.text, LINE_CHARS)) or cue.text
        # A cue must not end before it starts, nor overlap the next by rounding.
        end = max(cue.end, cue.start + 0.001)
        blocks.append(f"{number}\n{_stamp(cue.start, separator)} --> {_stamp(end, separator)}\n{lines}\n")
    body = "\n".join(blocks)
    return f"WEBVTT\n\n{body}" if fmt == "vtt" else body


def _stamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"
