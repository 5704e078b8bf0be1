"""What a Wyoming client asks: the kinds of request a connection answers in turn, their fields
parsed, and the voice a synthesis names resolved (a name, or a language some voice speaks)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wyoming.event import Event

from tts_gateway.core.compose import Core
from tts_gateway.engines.base import match_language
from tts_gateway.errors import InvalidField, TTSGatewayError
from tts_gateway.voices.catalog import ResolvedVoice
from tts_gateway.wyoming.info import usable_voices, voice_languages


# -- fields ------------------------------------------------------------------------------------------
@dataclass
class VoiceChoice:
    """The ``voice`` object of a request: ``name``, ``language``, ``speaker``, each optional."""

    name: str | None = None
    language: str | None = None
    speaker: str | None = None

    @staticmethod
    def parse(data: dict[str, Any]) -> VoiceChoice:
        raw = data.get("voice")
        if raw is None:
            return VoiceChoice()
        if not isinstance(raw, dict):
            raise InvalidField("voice", "must be an object with name, language and/or speaker")
        values: dict[str, str | None] = {}
        for key in ("name", "language", "speaker"):
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidField(f"voice.{key}", "must be a string")
            values[key] = (value.strip() or None) if isinstance(value, str) else None
        return VoiceChoice(**values)


def text_field(data: dict[str, Any]) -> str:
    text = data.get("text")
    if not isinstance(text, str):
        raise InvalidField("text", "must be a string")
    return text


def check_text_format(data: dict[str, Any], *, ssml: bool = False) -> str:
    """The request's ``text_format``: ``text``, or ``ssml`` where a whole document arrives at once (``synthesize``)."""
    fmt = data.get("text_format")
    if fmt in (None, "text"):
        return "text"
    if fmt == "ssml" and ssml:
        return "ssml"
    allowed = "text or ssml" if ssml else "only plain text (a stream's chunks cannot carry SSML)"
    raise InvalidField("text_format", f"{str(fmt)[:20]!r} is not supported here: {allowed}")


# -- the voice -----------------------------------------------------------------------------------------
@dataclass
class Voice:
    """A voice resolved once per request: what the engine needs and the language asked for."""

    resolved: ResolvedVoice
    language: str | None  # the engine's code for the requested language; None: the voice's own
    max_chars: int
    segment_language: str  # the language sentences are split by


def resolve_voice(core: Core, choice: VoiceChoice) -> Voice:
    """The voice a request names (or, given only a language, one that speaks it); blocking."""
    name = choice.name
    if name is None and choice.language is not None:
        name = voice_for_language(core, choice.language)
    resolved = core.voices.resolve(name)
    engine = core.engines.check_available(resolved.engine)
    language = match_language(engine, choice.language) if choice.language else None
    if choice.speaker is not None:
        raise InvalidField("voice.speaker", f"voice {resolved.name!r} has no speaker {choice.speaker[:40]!r} "
                                            "(no voice here has speakers; leave speaker out)",
                           code="unknown-speaker")
    segment_language = language or resolved.language or engine.languages[0]
    return Voice(resolved, language, engine.max_chars(segment_language), segment_language)


def voice_for_language(core: Core, language: str) -> str:
    """The default voice when it speaks ``language``, else the first usable voice that does."""
    wanted = language.strip().lower().replace("_", "-")

    def speaks(codes: list[str]) -> bool:
        return any(c == wanted or c.split("-")[0] == wanted.split("-")[0] for c in codes)

    voices = usable_voices(core)
    default = core.settings.default_voice
    ordered = sorted(voices, key=lambda v: (v["name"] != default, v["kind"] != "builtin"))
    for voice in ordered:
        if speaks([c.lower() for c in voice_languages(core, voice)]):
            return str(voice["name"])
    raise InvalidField("voice.language", f"no voice speaks {language[:20]!r}; describe lists the voices",
                       code="unsupported-language")


# -- requests ----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One thing to answer, in the order the client asked; a synthesis is counted by engine and outcome
    (``engine`` is known once the voice is)."""

    engine: str = "none"
    counted: bool = True


@dataclass
class Answer(Request):
    """A reply that needs no synthesis: ``info`` (built when its turn comes) or ``pong``."""

    make: Callable[[], Awaitable[Event]] | None = None
    counted: bool = False


@dataclass
class Refused(Request):
    """A request (or a stray event) that was wrong on arrival; its error goes out in turn."""

    error: TTSGatewayError = field(default_factory=lambda: TTSGatewayError("refused"))
    one_shot: bool = False  # a refused ``synthesize``: ends with audio-stop like any other


@dataclass
class OneShot(Request):
    """A ``synthesize``: the whole text at once."""

    text: str = ""
    choice: VoiceChoice = field(default_factory=VoiceChoice)
    text_format: str = "text"
