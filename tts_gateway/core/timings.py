"""Timings through the synthesis core: engine-relative word times become times in the response.

The core hands an engine one piece (sentence) at a time, puts `service.SENTENCE_PAUSE_S` of silence
between pieces, may time-stretch a piece (engines without their own speed control) and resamples.
`TimingClock` follows the audio through all of that, so that every time is in seconds from the start
of what the client receives; resampling keeps times in seconds as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from tts_gateway.audio import time_stretch
from tts_gateway.engines.timing import SENTENCE, WORD, TimedChunk, WordTiming

LEVELS = (WORD, SENTENCE)


@dataclass(frozen=True)
class TimedBytes:
    """Encoded audio and the timings of what it holds; ``duration`` (seconds) on the last item only."""

    audio: bytes
    words: tuple[WordTiming, ...] = ()
    sentences: tuple[WordTiming, ...] = ()
    duration: float | None = None


@dataclass
class Timings:
    """Everything a timed response says about its audio."""

    words: list[WordTiming] = field(default_factory=list)
    sentences: list[WordTiming] = field(default_factory=list)
    duration: float = 0.0

    @classmethod
    def of(cls, items: Iterable[TimedBytes]) -> Timings:
        """The timings of a whole answer, from its items."""
        found = cls()
        for item in items:
            found.add(item)
        return found

    def add(self, item: TimedBytes) -> None:
        self.words.extend(item.words)
        self.sentences.extend(item.sentences)
        if item.duration is not None:
            self.duration = item.duration

    def as_dict(self, words: bool) -> dict[str, object]:
        found: dict[str, object] = {"duration": round(self.duration, 3),
                                    "sentences": [as_dict(span) for span in self.sentences]}
        if words:
            found["words"] = [as_dict(word) for word in self.words]
        return found

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Timings:
        def spans(key: str) -> list[WordTiming]:
            values = data.get(key) or []
            assert isinstance(values, list)
            return [WordTiming(str(v["text"]), float(v["start"]), float(v["end"])) for v in values]

        duration = data.get("duration", 0.0)
        return cls(spans("words"), spans("sentences"), float(duration) if isinstance(duration, (int, float)) else 0.0)


def as_dict(span: WordTiming) -> dict[str, object]:
    return {"text": span.text, "start": round(span.start, 3), "end": round(span.end, 3)}


class TimingClock:
    """Samples sent so far at the engine's rate, after the core's own pauses and stretches."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.emitted = 0

    def start_piece(self, pause: np.ndarray | None) -> PieceBlock:
        return PieceBlock(self, pause)


class PieceBlock:
    """One piece's audio waiting to be sent, with the words in it (times from the block's start)."""

    def __init__(self, clock: TimingClock, pause: np.ndarray | None) -> None:
        self.clock = clock
        self.pending: list[np.ndarray] = [] if pause is None else [pause]
        self.size = 0 if pause is None else pause.size
        self.pause = self.size
        self.words: list[WordTiming] = []
        self.start: float | None = None

    def add(self, chunk: TimedChunk) -> None:
        offset = self.size / self.clock.rate
        self.words.extend(word.shifted(offset) for word in chunk.words)
        self.pending.append(chunk.audio)
        self.size += chunk.audio.size

    def take(self, speed: float = 1.0) -> tuple[np.ndarray, tuple[WordTiming, ...]]:
        """The waiting audio, stretched to ``speed``, and its words in the response's seconds."""
        block = np.concatenate(self.pending) if self.pending else np.zeros(0, np.float32)
        audio = time_stretch(block, self.clock.rate, speed) if speed != 1.0 else block
        scale = audio.size / block.size if block.size else 1.0
        offset = self.clock.emitted / self.clock.rate
        if self.start is None:
            self.start = offset + self.pause * scale / self.clock.rate
        words = tuple(word.shifted(offset, scale) for word in self.words)
        self.clock.emitted += audio.size
        self.pending, self.words, self.size, self.pause = [], [], 0, 0
        return audio, words

    def sentence(self, text: str) -> WordTiming:
        end = self.clock.emitted / self.clock.rate
        return WordTiming(text, end if self.start is None else self.start, end)
