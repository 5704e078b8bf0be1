"""The phrase cache: statistics and emptying it (admin)."""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Controller, delete, get

from tts_gateway.core.phrase_cache import PhraseCache
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.responses import CacheStats


class CacheController(Controller):
    path = "/v1/cache"
    tags = ("cache",)

    @get("/", opt={"scope": "admin"}, summary="Phrase cache size and hit ratio",
         **documented(*auth_problems("admin"), 503))
    async def cache_stats(self, phrase_cache: PhraseCache) -> CacheStats:
        return msgspec.convert(await asyncio.to_thread(phrase_cache.stats), CacheStats)

    @delete("/", status_code=204, opt={"scope": "admin"}, summary="Empty the phrase cache",
            **documented(*auth_problems("admin"), 503))
    async def cache_clear(self, phrase_cache: PhraseCache) -> None:
        await asyncio.to_thread(phrase_cache.clear)


__all__ = ["CacheController"]
