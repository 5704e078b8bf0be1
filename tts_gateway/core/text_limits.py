"""The bounds on a request's text (``TTS_GATEWAY_MAX_TEXT_CHARS``), worded once for every edge.

HTTP and a Wyoming ``synthesize`` check their whole text at once (`check_text`); a Wyoming stream
counts its chunks as they arrive (`TextBudget`). Both run the same checks with the same words, so a
text gets the same verdict whichever way it comes. Cheap bounds come first, so no text makes a check
slow: code points, then combining-mark runs, then graphemes and symbols.
"""

from __future__ import annotations

from tts_gateway.errors import InvalidField
from tts_gateway.text import (
    MAX_COMBINING_RUN,
    char_count,
    has_control_chars,
    has_speakable,
    longest_combining_run,
    spoken_length,
)

# A grapheme is rarely more than 8 code points; past that, counting graphemes is not needed.
CODE_POINTS_PER_CHAR = 8


class TextBudget:
    """One request's text counted against ``limit`` characters, whole or chunk by chunk.

    Each chunk is measured on its own, so a grapheme cluster split across two chunks counts twice.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.code_points = 0
        self.chars = 0
        self.spoken = 0
        self.blank = True
        self.speakable = False

    def add(self, text: str) -> None:
        """Count ``text``; raises `InvalidField` once the text so far breaks a bound."""
        limit = self.limit
        self.code_points += len(text)
        if self.code_points > limit * CODE_POINTS_PER_CHAR:
            raise InvalidField("text", f"is {self.code_points} code points; the limit is {limit} characters "
                                       "(TTS_GATEWAY_MAX_TEXT_CHARS)")
        run = longest_combining_run(text)
        if run:
            raise InvalidField("text", f"stacks {run} combining marks on one character; the limit is "
                                       f"{MAX_COMBINING_RUN}")
        self.chars += char_count(text)
        if self.chars > limit:
            raise InvalidField("text", f"is {self.chars} characters; the limit is {limit} "
                                       "(TTS_GATEWAY_MAX_TEXT_CHARS)")
        self.spoken += spoken_length(text)
        if self.spoken > limit:
            raise InvalidField("text", f"would be spoken as about {self.spoken} characters (symbols and emoji are "
                                       f"read out by name); the limit is {limit} (TTS_GATEWAY_MAX_TEXT_CHARS)")
        if has_control_chars(text):
            raise InvalidField("text", "contains control characters")
        self.blank = self.blank and not text.strip()
        self.speakable = self.speakable or has_speakable(text)

    def finish(self) -> None:
        """The text is complete: refuse it when there is nothing to speak."""
        if self.blank:
            raise InvalidField("text", "must not be empty")
        if not self.speakable:
            raise InvalidField("text", "has nothing to speak (only spaces, marks or invisible characters)")


def check_text(text: str, limit: int) -> None:
    """Refuse a whole text that is empty, too long or too costly (`InvalidField`)."""
    if not text.strip():  # before any counting: blank text of any length is "empty"
        raise InvalidField("text", "must not be empty")
    budget = TextBudget(limit)
    budget.add(text)
    budget.finish()
