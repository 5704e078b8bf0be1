"""Request bodies: msgspec Structs (unknown fields rejected where a typo must not pass) and multipart forms.

The limits a field must meet are enforced by the core (`SynthesisService.check_text`,
`check_options`), which words the 422 the client reads; here they are only *documented* in the
OpenAPI schema (``Meta(extra_json_schema=...)`` has no effect on decoding), from the same constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from litestar.datastructures import UploadFile

from tts_gateway.audio import FORMATS
from tts_gateway.core.captions import CAPTION_FORMATS
from tts_gateway.core.service import MAX_RATE, MAX_SEED, MAX_SPEED, MIN_RATE, MIN_SPEED
from tts_gateway.core.timings import LEVELS
from tts_gateway.gateway.openapi import OPENAPI_METADATA
from tts_gateway.gateway.speech_events import STREAM_FORMATS
from tts_gateway.voices.catalog import MAX_DESCRIPTION_CHARS
from tts_gateway.voices.names import VOICE_NAME_RE

# Not empty or blank, and no control characters other than tab and newlines (what `check_text` refuses).
_CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
TEXT_PATTERN = rf"^[^{_CONTROL}]*[^\s{_CONTROL}][^{_CONTROL}]*$"
NO_CONTROL_PATTERN = rf"^[^{_CONTROL}]*$"
TEXT_RULE = ("Not blank; no control characters other than tab and newlines; at most TTS_GATEWAY_MAX_TEXT_CHARS "
             "(default 5000) characters, counted as user-perceived characters")


def _documented(description: str, **schema: Any) -> msgspec.Meta:
    """OpenAPI-only constraints and description for a field (Litestar's ``schema_extra``)."""
    return msgspec.Meta(extra_json_schema={"description": description, "extra": schema})


Text = Annotated[str, _documented(TEXT_RULE, min_length=1, pattern=TEXT_PATTERN)]
Speed = Annotated[float, _documented(f"{MIN_SPEED:g}–{MAX_SPEED:g}; the engine's own rate control or a time "
                                     "stretch", minimum=MIN_SPEED, maximum=MAX_SPEED)]
SampleRate = Annotated[int, _documented(f"Resample to this rate ({MIN_RATE}–{MAX_RATE}); mp3 and opus accept "
                                        "only their standard rates", minimum=MIN_RATE, maximum=MAX_RATE)]
Seed = Annotated[int, _documented("The same seed with the same voice gives the same bytes", minimum=0,
                                  maximum=MAX_SEED)]
Format = Annotated[str, _documented("Output format", enum=list(FORMATS))]
TextFormat = Annotated[str, _documented("`text`, or `ssml`: a <speak> document (break, say-as, sub, phoneme, "
                                        "prosody rate, lang, p, s)", enum=["text", "ssml"])]
Normalize = Annotated[bool, _documented("Spell out numbers, dates, times, money, units and abbreviations "
                                        "(en, de, fr, es; numbers in other languages num2words knows)")]

Timestamps = Annotated[str, _documented(
    "Answer with JSON (`TimedSpeech`: base64 audio and when each word or sentence is heard) instead of audio "
    "bytes; with `stream`, server-sent events. `word` needs an engine that gives words (see GET /v1/engines)",
    enum=list(LEVELS))]
Captions = Annotated[str, _documented("Add WebVTT or SRT captions to the timed answer (implies `timestamps`)",
                                      enum=list(CAPTION_FORMATS))]

# The ``response_format`` values OpenAI documents that the gateway can send (``aac`` is refused with 422).
SPEECH_FORMATS = ("mp3", "opus", "flac", "wav", "pcm")
SpeechFormat = Annotated[str, _documented("Output format (OpenAI's `aac` is not supported)", enum=list(SPEECH_FORMATS))]


class SynthesizeBody(msgspec.Struct, forbid_unknown_fields=True):
    text: Text
    voice: Annotated[str, _documented("A built-in voice (`engine:voice`) or a preset; the default voice when "
                                      "absent")] | None = None
    language: Annotated[str, _documented("A language the voice's engine speaks (`en`, `en-US`, `pt`...); the "
                                         "voice's own when absent")] | None = None
    format: Format = "wav"
    sample_rate: SampleRate | None = None
    speed: Speed = 1.0
    stream: bool = False
    seed: Seed | None = None
    cache: bool = True
    text_format: TextFormat = "text"
    normalize: Normalize = True
    timestamps: Timestamps | None = None
    captions: Captions | None = None


class VoiceId(msgspec.Struct):
    """OpenAI's custom-voice form of ``voice``: ``{"id": ...}`` (the `openai` SDK sends it for saved voices)."""

    id: str


class SpeechBody(msgspec.Struct):
    """OpenAI ``POST /v1/audio/speech``; unknown fields are ignored, as OpenAI clients send newer ones.

    ``instructions`` is accepted, but no engine supports it: the response says so in a header.
    """

    input: Text
    model: Annotated[str, _documented("`tts-1`, `tts-1-hd`, `gpt-4o-mini-tts` (the default voice's engine) or an "
                                      "engine name (see GET /v1/models)")] = "tts-1"
    voice: Annotated[str, _documented("A preset, a built-in voice, or one of OpenAI's names (alloy, echo, ...) "
                                      "mapped by TTS_GATEWAY_OPENAI_VOICES; or `{\"id\": name}`"),
                     ] | VoiceId | None = None
    response_format: SpeechFormat = "mp3"
    speed: Speed = 1.0
    stream_format: Annotated[str, _documented("`audio` (the default): the audio bytes as they are made; `sse`: "
                                              "`text/event-stream` of `speech.audio.delta` events (base64 audio), "
                                              "then `speech.audio.done`", enum=[*STREAM_FORMATS, None])] | None = None
    instructions: Annotated[str, _documented("Accepted and not applied: the response then carries "
                                             "`X-Instructions-Ignored`")] | None = None
    text_format: TextFormat = "text"
    normalize: Normalize = True


class NormalizeBody(msgspec.Struct, forbid_unknown_fields=True):
    text: Text
    language: Annotated[str, _documented("A language the voice's engine speaks")]
    voice: Annotated[str, _documented("The voice whose engine and lexicon apply; the default voice when "
                                      "absent")] | None = None
    text_format: TextFormat = "text"
    normalize: Normalize = True


class LexiconBody(msgspec.Struct, forbid_unknown_fields=True):
    respelling: Annotated[str, _documented("How to write the word so that every engine says it right")] | None = None
    ipa: Annotated[str, _documented("IPA phonemes (kept; engines speak the word as written until they take IPA)")] \
        | None = None


def _form(**rules: Any) -> dict[str, Any]:
    """``field(metadata=...)`` documenting a form field in the OpenAPI schema (see `FormSchemaPlugin`)."""
    return {OPENAPI_METADATA: rules}


@dataclass
class VoiceForm:
    name: str = field(metadata=_form(pattern=VOICE_NAME_RE.pattern, description="The preset's name"))
    audio: list[UploadFile] = field(default_factory=list, metadata=_form(
        description="One or more reference clips: 2–60 s of speech in total (or send `blend`)"))
    engine: str = field(default="xtts", metadata=_form(description="A cloning engine, or a blending one with `blend`"))
    blend: str | None = field(default=None, metadata=_form(
        description="Instead of audio, for an engine whose voices mix (kokoro): `jf_alpha:0.6,jf_nezumi:0.4`"))
    language: str | None = field(default=None, metadata=_form(description="A language the engine speaks"))
    description: str = field(default="", metadata=_form(
        pattern=NO_CONTROL_PATTERN, max_length=MAX_DESCRIPTION_CHARS, description="Shown in every voice listing"))
    consent: str = field(default="false", metadata=_form(
        description="`true`, `1`, `yes` or `on`: the speaker consented to cloning"))


@dataclass
class LegacyForm:
    text: str = field(metadata=_form(min_length=1, pattern=TEXT_PATTERN, description=TEXT_RULE))
    speaker_audio: UploadFile = field(metadata=_form(description="A clip of the voice to speak with (2–60 s)"))
    language: str = "en"
