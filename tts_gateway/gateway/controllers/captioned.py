"""Kokoro-FastAPI's captioned speech, ``POST /dev/captioned_speech``, answered in its own shape.

Its clients send ``{model, input, voice, response_format, speed, stream, return_timestamps, lang_code, ...}``
and read ``{audio (base64), audio_format (a media type), timestamps: [{word, start_time, end_time}]}``:
one JSON object, or with ``stream`` (its default) one such object per line as the audio is made, each
with the words heard in its audio. Fields that would change the audio and cannot be honoured here are
a 422 naming them, never silently dropped.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Schema
from litestar.response import Stream

from tts_gateway.config import Settings
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import SynthesisRequest, SynthesisService
from tts_gateway.core.timings import TimedBytes
from tts_gateway.engines.kokoro_styles import PREFIX_LANGUAGES
from tts_gateway.engines.manager import EngineManager
from tts_gateway.engines.timing import SENTENCE, WORD, WordTiming
from tts_gateway.errors import Invalid, InvalidField
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.requests import json_body
from tts_gateway.gateway.schemas import SpeechFormat, Speed, Text
from tts_gateway.gateway.timed import run_timed
from tts_gateway.voices.catalog import VoiceCatalog

# The model names Kokoro-FastAPI accepts; an engine name is accepted too.
KOKORO_MODELS = ("kokoro", "tts-1", "tts-1-hd")
KOKORO_ENGINE = "kokoro"
# Kokoro-FastAPI's ``audio_format`` values: the media type of each ``response_format``.
AUDIO_FORMATS = {"mp3": "audio/mpeg", "opus": "audio/opus", "flac": "audio/flac", "wav": "audio/wav",
                 "pcm": "audio/pcm"}
# The core's names for the fields this route names differently.
RENAMED = {"text": "input", "format": "response_format", "language": "lang_code", "timestamps": "return_timestamps"}
PCM_RATE = 24000  # Kokoro-FastAPI's raw PCM is 24 kHz s16le, and its clients assume it


def _doc(description: str, **schema: Any) -> msgspec.Meta:
    """OpenAPI-only description and rules (the handler enforces them, with its own 422s)."""
    return msgspec.Meta(extra_json_schema={"description": description, "extra": schema})


class CaptionedSpeechBody(msgspec.Struct):
    """Kokoro-FastAPI's ``CaptionedSpeechRequest``; unknown fields are ignored, as Kokoro-FastAPI does."""

    input: Text
    model: Annotated[str, _doc("`kokoro`, `tts-1`, `tts-1-hd` or an engine name (which plain voice names "
                               "then belong to)")] = "kokoro"
    voice: Annotated[str, _doc("A Kokoro voice name (`af_heart`: `kokoro:af_heart`), a built-in voice "
                               "(`engine:voice`), a preset, or an OpenAI name; the default voice when "
                               "absent. Combinations (`a+b`) are not supported: register a blend",
                               pattern=r"^[^+(]*$")] | None = None
    response_format: SpeechFormat = "mp3"
    speed: Speed = 1.0
    stream: Annotated[bool, _doc("One JSON object per line as the audio is made (Kokoro-FastAPI's default)")] = True
    return_timestamps: bool = True
    lang_code: Annotated[str, _doc("Kokoro's one-letter code (`a`, `b`, `j`...) or a language code")] | None = None
    volume_multiplier: Annotated[float, _doc("Only 1 (not supported here)", enum=[1, None])] | None = 1.0
    normalization_options: Annotated[dict[str, Any], _doc("Accepted; the gateway's own text front end "
                                                          "normalizes")] | None = None
    return_download_link: Annotated[bool, _doc("Only false (no download files here)", enum=[False])] = False
    allow_voice_tags: Annotated[bool, _doc("Only false", enum=[False])] = False
    ssml: Annotated[bool, _doc("Only false", enum=[False])] = False
    voice_aliases: Annotated[dict[str, Any], _doc("Only absent or empty", max_properties=0)] | None = None


def _refuse_unsupported(data: CaptionedSpeechBody) -> None:
    if data.response_format == "aac":
        raise InvalidField("response_format", "aac is not supported here; use mp3, opus, flac, wav or pcm")
    if data.volume_multiplier is not None and data.volume_multiplier != 1.0:
        raise InvalidField("volume_multiplier", "is not supported here: send 1 or leave it out")
    if data.return_download_link:
        raise InvalidField("return_download_link", "is not supported here: the audio is in the answer")
    if data.allow_voice_tags or data.ssml:
        field = "ssml" if data.ssml else "allow_voice_tags"
        raise InvalidField(field, "voice tags and SSML translation are not supported on this route")
    if data.voice_aliases:
        raise InvalidField("voice_aliases", "are not supported here: name a voice or register a preset")


def captioned_voice(settings: Settings, engines: EngineManager, voices: VoiceCatalog, model: str,
                    voice: str | None) -> str | None:
    """The gateway voice for Kokoro-FastAPI's (``model``, ``voice``); None for the default voice."""
    if model not in KOKORO_MODELS and model not in engines.names:
        raise InvalidField("model", f"{model!r} is not {', '.join(KOKORO_MODELS)} or an engine "
                                    f"({', '.join(engines.names)})")
    if voice is None:
        return None
    if "+" in voice or "(" in voice:
        raise InvalidField("voice", "voice combinations are not supported here; register a blend with "
                                    "POST /v1/voices (engine kokoro, blend=a:0.6,b:0.4) and name it")
    if ":" in voice or voices.registry.exists(voice):
        return voice
    mapped = settings.openai_voice(voice)
    if mapped is not None:
        return mapped
    engine = model if model in engines.names else KOKORO_ENGINE
    return f"{engine}:{voice}"


def _language(lang_code: str | None) -> str | None:
    if lang_code is None or lang_code not in PREFIX_LANGUAGES:
        return lang_code
    return PREFIX_LANGUAGES[lang_code][0]


def _in_request_terms(exc: Invalid) -> Invalid:
    """The core's error about one of its fields, naming the field this request sent instead."""
    field = exc.field or ""
    sent = RENAMED.get(field)
    if sent is None:
        return exc
    detail = f"{sent}: {exc.detail.removeprefix(f'{field}: ')}"
    return Invalid(detail, code=exc.code, title=exc.title, field=sent, extra=exc.extra)


def _timestamps(words: Sequence[WordTiming]) -> list[dict[str, object]]:
    return [{"word": w.text, "start_time": round(w.start, 3), "end_time": round(w.end, 3)} for w in words]


def _line(audio: bytes, audio_format: str, timestamps: list[dict[str, object]]) -> bytes:
    body = {"audio": base64.b64encode(audio).decode("ascii"), "audio_format": audio_format, "timestamps": timestamps}
    return (json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def _lines(items: AsyncIterator[TimedBytes], audio_format: str, with_words: bool) -> AsyncIterator[bytes]:
    """One line per piece of audio with the words heard in it; words timed before any audio (a sentence's
    words come when it ends, MP3 is encoded at the end) wait for the next line that has audio."""
    waiting: list[WordTiming] = []
    sent = False
    async for item in items:
        if with_words:
            waiting.extend(item.words)
        if not item.audio:
            continue
        yield _line(item.audio, audio_format, _timestamps(waiting))
        waiting, sent = [], True
    if waiting or not sent:
        yield _line(b"", audio_format, _timestamps(waiting))


def _captioned_content() -> dict[str, OpenAPIMediaType]:
    word = Schema(type=OpenAPIType.OBJECT, title="WordTimestamp", required=["word", "start_time", "end_time"],
                  properties={"word": Schema(type=OpenAPIType.STRING),
                              "start_time": Schema(type=OpenAPIType.NUMBER, minimum=0,
                                                   description="Seconds from the start of the audio"),
                              "end_time": Schema(type=OpenAPIType.NUMBER, minimum=0)})
    answer = Schema(
        type=OpenAPIType.OBJECT, title="CaptionedSpeechResponse", required=["audio", "audio_format", "timestamps"],
        properties={
            "audio": Schema(type=OpenAPIType.STRING, content_encoding="base64",
                            description="The audio (with `stream`, this line's part of it)"),
            "audio_format": Schema(type=OpenAPIType.STRING, enum=list(AUDIO_FORMATS.values())),
            "timestamps": Schema(one_of=[Schema(type=OpenAPIType.ARRAY, items=word), Schema(type=OpenAPIType.NULL)],
                                 description="Each word of the input with when it is heard; null without "
                                             "`return_timestamps` (an empty list on streamed lines)"),
        },
        description="With `stream` (the default) the body is one such object per line, as the audio is made")
    return {"application/json": OpenAPIMediaType(schema=answer)}


class CaptionedSpeechController(Controller):
    path = "/dev"
    tags = ("kokoro-fastapi",)

    @post("/captioned_speech", status_code=200, opt={"scope": "synthesize"},
          before_request=json_body(CaptionedSpeechBody), summary="Kokoro-FastAPI's captioned speech",
          **documented(*auth_problems("synthesize"), 404, 409, 503, 504, body=True, content=_captioned_content(),
                       description="The audio (base64) and its word timings; with `stream`, one JSON object per line"))
    async def captioned_speech(self, data: CaptionedSpeechBody, dispatcher: Dispatcher, service: SynthesisService,
                               settings: Settings, engines: EngineManager, voices: VoiceCatalog,
                               request: Request[Any, Any, Any]) -> Response[Any]:
        """Audio with word-level timestamps, as Kokoro-FastAPI answers it: its clients work unchanged.

        Honoured: `model`, `input`, `voice`, `response_format`, `speed`, `stream`, `return_timestamps`,
        `lang_code`. `normalization_options` is accepted (the gateway's own text front end normalizes).
        `volume_multiplier` other than 1, `return_download_link`, `allow_voice_tags`, `ssml` and
        `voice_aliases` are a 422. Word timings need an engine that gives them (see GET /v1/engines).
        """
        _refuse_unsupported(data)
        voice = await asyncio.to_thread(captioned_voice, settings, engines, voices, data.model, data.voice)
        fmt = data.response_format
        synthesis = SynthesisRequest(
            text=data.input, voice=voice, language=_language(data.lang_code), format=fmt, speed=data.speed,
            stream=data.stream, sample_rate=PCM_RATE if fmt == "pcm" else None,
            # Without timestamps the sentence timings every engine gives are run and left out.
            timestamps=WORD if data.return_timestamps else SENTENCE,
        )
        try:
            plan = await asyncio.to_thread(service.plan, synthesis)  # checks the text too: never on the event loop
        except Invalid as exc:
            raise _in_request_terms(exc) from None
        outcome = await run_timed(dispatcher, plan, request)
        audio_format = AUDIO_FORMATS[fmt]
        headers = {**outcome.headers, "Content-Disposition": f"attachment; filename=speech.{fmt}",
                   "Cache-Control": "no-cache"}
        if plan.stream:
            return Stream(_lines(outcome.items(), audio_format, data.return_timestamps), media_type="application/json",
                          headers={**headers, "X-Accel-Buffering": "no"})
        assert outcome.audio is not None and outcome.timings is not None
        body = {"audio": base64.b64encode(outcome.audio).decode("ascii"), "audio_format": audio_format,
                "timestamps": _timestamps(outcome.timings.words) if data.return_timestamps else None}
        return Response(body, media_type="application/json", headers=headers)


__all__ = ["AUDIO_FORMATS", "CaptionedSpeechBody", "CaptionedSpeechController", "captioned_voice"]
