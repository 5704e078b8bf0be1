"""The text of a ``synthesize-start`` … ``synthesize-stop`` stream, cut into sentences as they complete.

Its text is bounded like one request's, by the synthesis core's own checks (`TextBudget`), so a
stream is refused with the words an HTTP request with the same text gets.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from tts_gateway.core.text_limits import TextBudget
from tts_gateway.errors import InvalidField, TTSGatewayError
from tts_gateway.text import has_speakable, split_sentences
from tts_gateway.wyoming.requests import Request, Voice

# Marks a sentence can end with (Latin, CJK, Arabic, Devanagari …): without one, a stream's text cannot
# hold a complete sentence yet.
SENTENCE_END = re.compile(r"[.!?。！？｡…؟।۔\n]")
INLINE_SPLIT_CHARS = 2000


@dataclass
class TextStream(Request):
    """A stream's text as it arrives, and the sentences of it ready to speak.

    A sentence is complete once text after it has arrived (the segmenter then ends it); whatever is
    left when the client stops is the last one. Text past the limit or with control characters fails
    the stream: the rest of its text is dropped until ``synthesize-stop``.
    """

    budget: TextBudget = field(kw_only=True)  # the request's text limit (TTS_GATEWAY_MAX_TEXT_CHARS)
    voice: Voice | None = None
    error: TTSGatewayError | None = None
    closed: bool = False
    tail: str = ""
    ready: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, error: TTSGatewayError) -> None:
        if self.error is None:
            self.error = error
        self.changed.set()

    async def add(self, text: str) -> None:
        if self.error is not None or self.closed or self.voice is None:
            return
        try:
            self.budget.add(text)
        except TTSGatewayError as exc:
            self.fail(exc)
            return
        buffered = self.tail + text
        voice = self.voice
        if not SENTENCE_END.search(buffered) and len(buffered) <= voice.max_chars:
            self.tail = buffered  # no sentence can have ended: the segmenter is not needed yet
            return
        args = (buffered, voice.segment_language, voice.max_chars)
        # Short text is split right here (about a millisecond); a thread hop would cost more on a busy host.
        pieces = split_sentences(*args) if len(buffered) <= INLINE_SPLIT_CHARS else (
            await asyncio.to_thread(split_sentences, *args))
        if len(pieces) > 1:
            self.ready.extend(p for p in pieces[:-1] if has_speakable(p))
            # the open sentence, with the word break the client may have sent at its end
            self.tail = pieces[-1] + (" " if buffered[-1:].isspace() else "")
            self.changed.set()
            await asyncio.sleep(0)  # let the request start on it before more buffered text is read
        else:
            self.tail = buffered

    def finish(self) -> None:
        """The client sent ``synthesize-stop``: what is left is the last sentence."""
        if self.error is None and not self.closed and has_speakable(self.tail):
            self.ready.append(self.tail.strip())
        self.tail = ""
        self.closed = True
        self.changed.set()
        self.stopped.set()

    async def next_batch(self, first: bool = False) -> list[str] | None:
        """The complete sentences not yet spoken (waiting for one), or None at the end; raises its error.

        The ``first`` batch is the first sentence alone, so its audio comes soonest; later batches take
        every sentence that is ready, spoken in order as one streamed plan while the audio before them
        plays.
        """
        while True:
            if self.error is not None:
                raise self.error
            if self.ready:
                take = 1 if first else len(self.ready)
                batch, self.ready = self.ready[:take], self.ready[take:]
                return batch
            if self.closed:
                return None
            self.changed.clear()
            await self.changed.wait()

    def nothing_spoken(self) -> InvalidField:
        """Why a stream that ended without a sentence is refused: the words a request with its text gets."""
        try:
            self.budget.finish()
        except InvalidField as exc:
            return exc
        return InvalidField("text", "has nothing to speak")
