"""Voices: list, one, register a preset (multipart), delete."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body

from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import SynthesisService
from tts_gateway.errors import InvalidField
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import LOCATION_HEADERS, documented
from tts_gateway.gateway.requests import require_multipart
from tts_gateway.gateway.responses import PresetVoice, Voice, VoiceList
from tts_gateway.gateway.schemas import VoiceForm
from tts_gateway.voices.catalog import VoiceCatalog

CONSENT_YES = {"1", "true", "yes", "on"}


class VoicesController(Controller):
    path = "/v1/voices"
    tags = ("voices",)

    @get("/", opt={"scope": "any"}, summary="List built-in voices and presets",
         **documented(*auth_problems("any"), 503))
    async def list_voices(self, voices: VoiceCatalog) -> VoiceList:
        """Built-in voices of available engines, then presets. While the voice registry cannot be read
        (its index damaged and not rebuilt, its storage or database unreachable) this answers 503 with
        Retry-After naming the cause, never a list without the presets."""
        return msgspec.convert({"voices": await asyncio.to_thread(voices.all)}, VoiceList)

    @get("/{name:str}", opt={"scope": "any"}, summary="One voice",
         **documented(*auth_problems("any"), 404, 409, 503))
    async def get_voice(self, name: str, voices: VoiceCatalog) -> Voice:
        voice: Voice = msgspec.convert(await asyncio.to_thread(voices.describe, name), Voice)
        return voice

    @delete("/{name:str}", status_code=204, opt={"scope": "voices"}, summary="Delete a preset",
            **documented(*auth_problems("voices"), 404, 409, 503))
    async def delete_voice(self, name: str, voices: VoiceCatalog, service: SynthesisService) -> None:
        await asyncio.to_thread(voices.delete, name)
        if service.lexicon is not None:  # a later preset of this name starts without these entries
            await asyncio.to_thread(service.lexicon.drop_scope, name)

    @post("/", status_code=201, opt={"scope": "voices"}, before_request=require_multipart,
          summary="Register a preset: latents are computed once and stored",
          **documented(*auth_problems("voices"), 404, 409, 503, 504, body=True, headers=LOCATION_HEADERS))
    async def create_voice(
        self,
        data: Annotated[VoiceForm, Body(media_type=RequestEncodingType.MULTI_PART)],
        dispatcher: Dispatcher,
        voices: VoiceCatalog,
    ) -> Response[PresetVoice]:
        if data.blend is not None:
            if data.audio:
                raise InvalidField("blend", "send either audio to clone or a blend of built-in voices, not both")
            blend = data.blend
            record = await dispatcher.blocking(lambda: voices.register_blend(
                data.name, blend, engine_name=data.engine or "xtts", language=data.language or None,
                description=data.description or ""))
            voice = msgspec.convert(record, PresetVoice)
            return Response(voice, status_code=201, headers={"Location": f"/v1/voices/{voice.name}"})
        uploads: list[Any] = data.audio if isinstance(data.audio, list) else [data.audio]
        files = []
        for index, upload in enumerate(uploads):
            if not hasattr(upload, "read"):
                raise InvalidField("audio", "must be one or more uploaded audio files")
            files.append((upload.filename or f"audio[{index}]", await upload.read()))
        if not files:
            raise InvalidField("audio", "send at least one reference audio file")
        consent = str(data.consent).strip().lower() in CONSENT_YES
        record = await dispatcher.blocking(lambda: voices.register(
            data.name, files, engine_name=data.engine or "xtts", language=data.language or None,
            description=data.description or "", consent=consent,
        ))
        voice = msgspec.convert(record, PresetVoice)
        return Response(voice, status_code=201, headers={"Location": f"/v1/voices/{voice.name}"})


__all__ = ["VoicesController"]
