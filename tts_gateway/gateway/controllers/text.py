"""The text front end over HTTP: the dry run (``POST /v1/text/normalize``) and the pronunciation lexicon
(``PUT/GET/DELETE /v1/lexicon/{language}/{word}``, admin; ``?voice=`` for a preset's own entries)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from litestar import Controller, Response, delete, get, post, put
from litestar.params import Parameter

from tts_gateway.core.service import SENTENCE_PAUSE_S, SynthesisRequest, SynthesisService
from tts_gateway.errors import InvalidField, Unavailable
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.requests import json_body
from tts_gateway.gateway.responses import LexiconEntryBody, NormalizeResult, SpokenPiece
from tts_gateway.gateway.schemas import LexiconBody, NormalizeBody
from tts_gateway.voices.catalog import VoiceCatalog
from tts_gateway.voices.lexicon import Lexicon, LexiconEntry, check_entry

VoiceQuery = Annotated[str | None, Parameter(query="voice", description="A preset: its own entries instead of "
                                                                        "the gateway's", required=False)]


def _lexicon(service: SynthesisService) -> Lexicon:
    if service.lexicon is None:
        raise Unavailable("the lexicon is not open in this process")
    return service.lexicon


def _scope(voices: VoiceCatalog, voice: str | None) -> str:
    if voice is None:
        return ""
    if ":" in voice:
        raise InvalidField("voice", f"{voice[:64]!r} is a built-in voice; its words go in the gateway's lexicon "
                                    "(leave voice out)")
    voices.registry.get(voice)  # 404 for a preset that does not exist
    return voice


class TextController(Controller):
    path = "/v1"
    tags = ("text",)

    @post("/text/normalize", status_code=200, opt={"scope": "synthesize"}, before_request=json_body(NormalizeBody),
          summary="Dry run: the text each piece of the voice's engine will be given",
          **documented(*auth_problems("synthesize"), 404, 503, body=True))
    async def normalize(self, data: NormalizeBody, service: SynthesisService) -> NormalizeResult:
        """Runs the text front end (SSML, lexicon, normalization) and the sentence split, and synthesizes nothing."""
        request = SynthesisRequest(text=data.text, voice=data.voice, language=data.language,
                                   text_format=data.text_format, normalize=data.normalize, cache=False)
        plan = await asyncio.to_thread(service.plan, request)
        def pause(index: int) -> float:
            exact = plan.pause_before(index)
            return SENTENCE_PAUSE_S if exact is None else exact

        pieces = [SpokenPiece(text=piece, language=plan.piece_language(i), speed=plan.piece_speed(i),
                              pause_before=pause(i)) for i, piece in enumerate(plan.pieces)]
        return NormalizeResult(text=" ".join(plan.pieces), language=plan.language, voice=plan.voice.name,
                               engine=plan.engine_name, pieces=pieces, pause_after=plan.end_pause,
                               lexicon=list(plan.lexicon))

    @get("/lexicon/{language:str}/{word:str}", opt={"scope": "admin"}, summary="One lexicon entry",
         **documented(*auth_problems("admin"), 404, 422, 503))
    async def get_entry(self, language: str, word: str, service: SynthesisService, voices: VoiceCatalog,
                        voice: VoiceQuery = None) -> LexiconEntryBody:
        lexicon = _lexicon(service)

        def find() -> LexiconEntry:
            return lexicon.get(language, word, _scope(voices, voice))

        entry = await asyncio.to_thread(find)
        return LexiconEntryBody(word=entry.word, language=entry.language, respelling=entry.respelling, ipa=entry.ipa,
                                voice=voice)

    @put("/lexicon/{language:str}/{word:str}", opt={"scope": "admin"}, before_request=json_body(LexiconBody),
         summary="Add or replace a lexicon entry (201 when new)",
         **documented(*auth_problems("admin"), 404, 503, body=True))
    async def put_entry(self, language: str, word: str, data: LexiconBody, service: SynthesisService,
                        voices: VoiceCatalog, voice: VoiceQuery = None) -> Response[LexiconEntryBody]:
        """`{"respelling": "…"}` (every engine) or `{"ipa": "…"}`; durable when this answers."""
        lexicon = _lexicon(service)
        entry = check_entry(LexiconEntry(word, language, data.respelling, data.ipa))

        def store() -> bool:
            return lexicon.put(entry, _scope(voices, voice))

        new = await asyncio.to_thread(store)
        body = LexiconEntryBody(word=entry.word, language=entry.language, respelling=entry.respelling, ipa=entry.ipa,
                                voice=voice)
        return Response(body, status_code=201 if new else 200)

    @delete("/lexicon/{language:str}/{word:str}", status_code=204, opt={"scope": "admin"},
            summary="Remove a lexicon entry", **documented(*auth_problems("admin"), 404, 422, 503))
    async def delete_entry(self, language: str, word: str, service: SynthesisService, voices: VoiceCatalog,
                           voice: VoiceQuery = None) -> None:
        lexicon = _lexicon(service)
        await asyncio.to_thread(lambda: lexicon.delete(language, word, _scope(voices, voice)))


__all__ = ["TextController"]
