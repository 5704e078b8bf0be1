"""``POST /v1/synthesize`` and the old service's ``POST /synthesize``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Controller, Request, Response, post
from litestar.enums import RequestEncodingType
from litestar.params import Body

from tts_gateway.audio import FORMATS
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import SynthesisRequest, SynthesisService
from tts_gateway.errors import InvalidField
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.requests import json_body, require_multipart
from tts_gateway.gateway.respond import respond
from tts_gateway.gateway.schemas import LegacyForm, SynthesizeBody
from tts_gateway.gateway.timed import respond_timed
from tts_gateway.voices.catalog import ResolvedVoice, VoiceCatalog

LEGACY_RATE = 16000
LEGACY_ENGINE = "xtts"


class SynthesisController(Controller):
    path = "/"

    @post("/v1/synthesize", status_code=200, opt={"scope": "synthesize"}, tags=["synthesis"],
          before_request=json_body(SynthesizeBody), summary="Synthesize speech",
          **documented(*auth_problems("synthesize"), 404, 409, 503, 504, audio=FORMATS, body=True, timed=True))
    async def synthesize(self, data: SynthesizeBody, dispatcher: Dispatcher,
                         service: SynthesisService, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Text → audio with a built-in voice (`engine:voice`) or a registered preset; with `timestamps`, JSON
        with the audio and when each word or sentence is heard (server-sent events when it streams)."""
        synthesis = SynthesisRequest(
            text=data.text, voice=data.voice, language=data.language, format=data.format,
            sample_rate=data.sample_rate, speed=data.speed, seed=data.seed, stream=data.stream, cache=data.cache,
            text_format=data.text_format, normalize=data.normalize,
            timestamps=data.timestamps, captions=data.captions,
        )
        plan = await asyncio.to_thread(service.plan, synthesis)  # checks the text too: never on the event loop
        if plan.timestamps is not None:
            return await respond_timed(dispatcher, plan, request)
        return await respond(dispatcher, plan, request=request)

    @post("/synthesize", status_code=200, opt={"scope": "synthesize"}, tags=["legacy"],
          before_request=require_multipart,
          summary="The old service's call: text + speaker_audio → 16 kHz WAV via XTTS",
          **documented(*auth_problems("synthesize"), 404, 409, 503, 504, audio=["wav"], body=True))
    async def legacy_synthesize(
        self,
        data: Annotated[LegacyForm, Body(media_type=RequestEncodingType.MULTI_PART)],
        dispatcher: Dispatcher,
        service: SynthesisService,
        voices: VoiceCatalog,
        request: Request[Any, Any, Any],
    ) -> Response[bytes]:
        """Unchanged from the old service: the latents of an uploaded clip are cached by its audio hash."""
        if not hasattr(data.speaker_audio, "read"):
            raise InvalidField("speaker_audio", "must be an uploaded audio file")
        await asyncio.to_thread(service.check_text, data.text)  # before the upload is conditioned
        audio = await data.speaker_audio.read()
        label = data.speaker_audio.filename or "speaker_audio"
        voice: ResolvedVoice = await dispatcher.blocking(
            lambda: voices.condition_upload([(label, audio)], LEGACY_ENGINE))
        synthesis = SynthesisRequest(text=data.text, language=data.language or "en", format="wav",
                                     sample_rate=LEGACY_RATE)
        plan = await asyncio.to_thread(service.plan, synthesis, voice)
        return await respond(dispatcher, plan, request=request)


__all__ = ["SynthesisController"]
