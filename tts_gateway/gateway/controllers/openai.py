"""OpenAI compatibility: ``POST /v1/audio/speech`` and the discovery calls clients make first.

* ``GET /v1/models`` — OpenAI's list shape: ``tts-1``, ``tts-1-hd``, ``gpt-4o-mini-tts`` and every
  available engine name, the values ``model`` accepts.
* ``GET /v1/audio/voices`` — the shape Kokoro-FastAPI serves and Open WebUI reads
  (``{"voices": [{"id", "name"}]}``; ``?legacy=true`` gives plain names, as Kokoro-FastAPI does).
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream

from tts_gateway.config import Settings
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import SynthesisRequest, SynthesisService
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import InvalidField
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import INSTRUCTIONS_HEADER, INSTRUCTIONS_HEADERS, documented
from tts_gateway.gateway.requests import json_body
from tts_gateway.gateway.respond import outcome_of, respond
from tts_gateway.gateway.responses import OpenAIModel, OpenAIModelList, OpenAIVoice, OpenAIVoiceList
from tts_gateway.gateway.schemas import SPEECH_FORMATS, SpeechBody, VoiceId
from tts_gateway.gateway.speech_events import SSE_CONTENT, SSE_HEADERS, SSE_MEDIA_TYPE, STREAM_FORMATS, speech_events
from tts_gateway.voices.catalog import VoiceCatalog

OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
OWNER = "tts-gateway"
INSTRUCTIONS_NOTE = "no engine here supports instructions"


def openai_voice(settings: Settings, engines: EngineManager, voices: VoiceCatalog, model: str,
                 voice: str | None) -> str:
    """The gateway voice for an OpenAI (``model``, ``voice``) pair; `InvalidField` when they do not fit."""
    if model in OPENAI_MODELS:
        engine_name = None
    elif model in engines.names:
        engine_name = model
    else:
        raise InvalidField("model", f"{model!r} is not {', '.join(OPENAI_MODELS)} or an engine "
                                    f"({', '.join(engines.names)})")
    if voice is None:
        voice = "alloy"
    mapped = settings.openai_voice(voice) if ":" not in voice and not voices.registry.exists(voice) else None
    if mapped is not None:
        voice = mapped
        if engine_name and (":" not in voice or voice.split(":")[0] != engine_name):
            builtins = engines.get(engine_name).voices()
            if not builtins:
                raise InvalidField("voice", f"engine {engine_name!r} has no built-in voice for {voice!r}")
            english = [v for v in builtins if v.language.startswith("en")]
            voice = f"{engine_name}:{(english or builtins)[0].id}"
        return voice
    if engine_name:
        resolved_engine = voice.split(":")[0] if ":" in voice else voices.preset_engine(voice)
        # A misspelt engine ("Piper:joe") is left to the catalog, whose 404 says what was meant.
        if resolved_engine in engines.names and resolved_engine != engine_name:
            raise InvalidField("voice", f"voice {voice!r} belongs to engine {resolved_engine!r}, not {engine_name!r}")
    return voice


class OpenAIController(Controller):
    path = "/v1"
    tags = ("openai",)

    @post("/audio/speech", status_code=200, opt={"scope": "synthesize"}, before_request=json_body(SpeechBody),
          summary="OpenAI-compatible speech",
          **documented(*auth_problems("synthesize"), 404, 409, 503, 504, audio=SPEECH_FORMATS, body=True,
                       headers=INSTRUCTIONS_HEADERS, content=SSE_CONTENT))
    async def speech(self, data: SpeechBody, dispatcher: Dispatcher, service: SynthesisService,
                     settings: Settings, engines: EngineManager, voices: VoiceCatalog,
                     request: Request[Any, Any, Any]) -> Response[Any]:
        """Works with the `openai` SDK: `client.audio.speech.create(model=..., voice=..., input=...)`.

        `instructions` are accepted but no engine here supports them: the response then carries
        `X-Instructions-Ignored`. `stream_format: sse` sends OpenAI's `speech.audio.delta` events (base64
        audio in any `response_format`), then `speech.audio.done`.
        """
        if data.stream_format is not None and data.stream_format not in STREAM_FORMATS:
            raise InvalidField("stream_format", f"{data.stream_format!r} is not one of {', '.join(STREAM_FORMATS)}")
        if data.response_format == "aac":
            raise InvalidField("response_format", "aac is not supported here; use mp3, opus, flac, wav or pcm")
        named = data.voice.id if isinstance(data.voice, VoiceId) else data.voice
        voice = await asyncio.to_thread(openai_voice, settings, engines, voices, data.model, named)
        fmt = data.response_format
        synthesis = SynthesisRequest(
            text=data.input, voice=voice, format=fmt, speed=data.speed, stream=True,
            sample_rate=24000 if fmt == "pcm" else None,  # OpenAI's pcm is 24 kHz s16le
            text_format=data.text_format, normalize=data.normalize,
        )
        plan = await asyncio.to_thread(service.plan, synthesis)  # checks the text too: never on the event loop
        ignored = {INSTRUCTIONS_HEADER: INSTRUCTIONS_NOTE} if data.instructions and data.instructions.strip() else None
        if data.stream_format != "sse":
            return await respond(dispatcher, plan, ignored, request=request)
        outcome = await outcome_of(dispatcher, plan, request)
        return Stream(speech_events(outcome), media_type=SSE_MEDIA_TYPE,
                      headers={**outcome.headers, **SSE_HEADERS, **(ignored or {})})

    @get("/models", opt={"scope": "any"}, summary="Models (OpenAI list shape)",
         **documented(*auth_problems("any")))
    async def models(self, engines: EngineManager, state: State) -> OpenAIModelList:
        """What `model` accepts: OpenAI's speech model names (the default voice's engine) and every available engine."""
        created = int(state.started_at)

        def available() -> list[str]:
            return [name for name in engines.names if engines.get(name).availability()[0]]

        names = [*OPENAI_MODELS, *await asyncio.to_thread(available)]
        return OpenAIModelList(data=[OpenAIModel(id=name, created=created, owned_by=OWNER) for name in names])

    @get("/audio/voices", opt={"scope": "any"}, summary="Voice names for OpenAI-compatible clients",
         **documented(*auth_problems("any"), 422, 503))
    async def list_voices(self, voices: VoiceCatalog, legacy: bool = False) -> OpenAIVoiceList:
        """Every voice `voice` accepts by name (built-ins and presets), as Open WebUI reads them.

        `?legacy=true` lists plain names (`{"voices": ["piper:joe", ...]}`).
        """
        names = [str(v["name"]) for v in await asyncio.to_thread(voices.all)]
        if legacy:
            return OpenAIVoiceList(voices=list(names))
        return OpenAIVoiceList(voices=[OpenAIVoice(id=name, name=name) for name in names])


__all__ = ["OPENAI_MODELS", "OpenAIController", "openai_voice"]
