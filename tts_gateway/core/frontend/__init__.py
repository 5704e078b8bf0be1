"""The text front end: one entry point, `prepare`, that turns a request's text into what every engine speaks.

The synthesis service calls it before splitting sentences, so every front door (HTTP, OpenAI, the old
``/synthesize``, Wyoming, the CLI) and the phrase cache key see the same spoken text. In order:
SSML (when asked) → segments with their pauses, rates and languages; the lexicon (preset entries, then
the gateway's) → respellings; normalization → numbers, dates, money, units and abbreviations in words.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tts_gateway.core.frontend.lexicon import respell
from tts_gateway.core.frontend.normalize import normalize, normalizer
from tts_gateway.core.frontend.segments import Segment, Spoken
from tts_gateway.core.frontend.ssml import SsmlError, parse
from tts_gateway.errors import InvalidField
from tts_gateway.voices.lexicon import LexiconEntry

TEXT_FORMATS = ("text", "ssml")
Entries = Callable[[str], Mapping[str, LexiconEntry]]  # language → the lexicon entries that apply


def _say_as(language: str) -> Callable[[str, str, str | None, str | None], str | None]:
    def say(kind: str, text: str, fmt: str | None, lang: str | None) -> str | None:
        rules = normalizer(lang or language)
        return None if rules is None else rules.say_as(kind, text, fmt)

    return say


def prepare(text: str, language: str, *, text_format: str = "text", normalize_text: bool = True,
            lexicon: Entries | None = None, speaks: Callable[[str], str | None] = lambda code: None,
            phonemes: bool = False) -> Spoken:
    """``text`` as it will be spoken in ``language``.

    Args:
        text: The request's text (plain, or an SSML document with ``text_format="ssml"``).
        language: The engine's code for the request's language.
        text_format: ``text`` or ``ssml``.
        normalize_text: Spell out numbers, dates and abbreviations (``"normalize": false`` turns it off).
        lexicon: The entries for a language (the preset's over the gateway's).
        speaks: The engine's code for a ``<lang>`` language, or None when the voice does not speak it (that
            text is then spoken in the request's language).
        phonemes: The engine takes IPA inline as ``[[ … ]]`` (`Capabilities.phonemes`): IPA lexicon entries and
            ``<phoneme>`` are given to it so; otherwise the written word is spoken.

    Raises:
        InvalidField: unknown ``text_format``; `SsmlError` (a kind of it) for SSML that is refused.
    """
    if text_format not in TEXT_FORMATS:
        raise InvalidField("text_format", f"{str(text_format)[:20]!r} is not one of {', '.join(TEXT_FORMATS)}")
    if text_format == "ssml":
        segments, pause_after, written = parse(text, _say_as(language), phonemes=phonemes)
    else:
        segments, pause_after, written = [Segment(text)], 0.0, text
    out: list[Segment] = []
    applied: dict[str, None] = {}
    for segment in segments:
        spoken_in = (speaks(segment.language) if segment.language else None) or language
        words = segment.text
        if lexicon is not None:
            words, used = respell(words, lexicon(spoken_in), phonemes)
            applied.update(dict.fromkeys(used))
        if normalize_text:
            words = normalize(words, spoken_in)
        out.append(Segment(words, segment.pause_before, segment.rate, spoken_in if spoken_in != language else None))
    return Spoken(tuple(out), pause_after, tuple(applied), written)


__all__ = ["TEXT_FORMATS", "Segment", "Spoken", "SsmlError", "normalize", "prepare"]
