"""What the front end hands the synthesis service: text in segments, each with its own pause, rate and
language."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Segment:
    """A stretch of text spoken one way.

    Attributes:
        text: What to say.
        pause_before: Seconds of silence before it: an SSML ``<break>`` (exact), ``0`` inside a sentence
            (a change of rate or language), None for the usual pause between sentences.
        rate: Speed factor on top of the request's ``speed`` (``<prosody rate>``).
        language: The language to speak it in, when not the request's (``<lang>``).
    """

    text: str
    pause_before: float | None = None
    rate: float = 1.0
    language: str | None = None

    def with_text(self, text: str) -> Segment:
        return replace(self, text=text)


@dataclass(frozen=True)
class Spoken:
    """A request's text as it will be spoken."""

    segments: tuple[Segment, ...]
    pause_after: float = 0.0  # a ``<break>`` at the very end
    lexicon: tuple[str, ...] = field(default=())  # the words a lexicon entry respelled
    # The text as written, whose words timings name: the request's text, or an SSML document's text
    # content (a <sub>'s or <say-as>'s content as written, not what it is spoken as).
    written: str = ""

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)
