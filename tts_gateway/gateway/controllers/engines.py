"""Engines (list, one, load, unload) and the languages they speak."""

from __future__ import annotations

import asyncio

from litestar import Controller, get, post

from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.metrics import Metrics
from tts_gateway.engines.base import CloningEngine, LanguageNamingEngine, ReplicatedEngine, timestamp_levels
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import Conflict
from tts_gateway.gateway.auth import auth_problems
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.responses import (
    Engine,
    EngineCapabilities,
    EngineList,
    EngineModel,
    EngineReplica,
    Language,
)
from tts_gateway.languages import language_name

BUSY_RETRY_AFTER_S = 5


def describe_engine(engines: EngineManager, name: str) -> Engine:
    """What ``GET /v1/engines/{name}`` says about an engine; `UnknownEngine` (404) when there is none."""
    engine = engines.get(name)
    available, reason = engine.availability()
    try:
        model = engine.model
    except Exception:  # an unavailable engine may not be able to describe its model
        model = None
    return Engine(
        name=name,
        available=available,
        reason=reason,
        loaded=engine.loaded,
        languages=list(engine.languages) if available else [],
        capabilities=EngineCapabilities(cloning=isinstance(engine, CloningEngine),
                                        streaming=engine.capabilities.streaming,
                                        timestamps=list(timestamp_levels(engine))),
        sample_rate=engine.sample_rate,
        model=EngineModel(id=model.id, sha256=model.sha256, licence=model.licence) if model else None,
        voices=[f"{name}:{v.id}" for v in engine.voices()] if available else [],
        replicas=[EngineReplica(**r) for r in engine.replicas()] if isinstance(engine, ReplicatedEngine) else None,
    )


def collect_languages(engines: EngineManager) -> list[Language]:
    table: dict[str, Language] = {}
    for name in engines.names:
        engine = engines.get(name)
        if not engine.availability()[0]:
            continue
        names = engine.language_names if isinstance(engine, LanguageNamingEngine) else {}
        for code in engine.languages:
            entry = table.get(code)
            if entry is None:
                entry = table[code] = Language(code=code, name=names.get(code) or language_name(code), engines=[])
            entry.engines.append(name)
    return sorted(table.values(), key=lambda e: e.code)


class EnginesController(Controller):
    path = "/v1"
    tags = ("engines",)

    @get("/engines", opt={"scope": "any"}, summary="List engines", **documented(*auth_problems("any")))
    async def list_engines(self, engines: EngineManager) -> EngineList:
        return EngineList(engines=await asyncio.to_thread(
            lambda: [describe_engine(engines, name) for name in engines.names]))

    @get("/engines/{name:str}", opt={"scope": "any"}, summary="One engine",
         **documented(*auth_problems("any"), 404))
    async def get_engine(self, name: str, engines: EngineManager) -> Engine:
        engines.get(name)  # UnknownEngine (404) when there is none
        return await asyncio.to_thread(describe_engine, engines, name)

    @post("/engines/{name:str}/load", status_code=200, opt={"scope": "admin"},
          summary="Load an engine's model now", **documented(*auth_problems("admin"), 404, 503, 504))
    async def load_engine(self, name: str, engines: EngineManager, dispatcher: Dispatcher,
                          metrics: Metrics) -> Engine:
        engine = engines.get(name)
        if isinstance(engine, ReplicatedEngine):  # every replica loads; they report tts_engine_loaded themselves
            await dispatcher.blocking(engine.load)
            return await asyncio.to_thread(describe_engine, engines, name)
        await dispatcher.blocking(lambda: engines.ensure_loaded(name))
        metrics.engine_loaded.labels(name).set(1)
        return describe_engine(engines, name)

    @post("/engines/{name:str}/unload", status_code=200, opt={"scope": "admin"},
          summary="Unload an engine's model and free its memory", **documented(*auth_problems("admin"), 404, 409))
    async def unload_engine(self, name: str, engines: EngineManager, metrics: Metrics) -> Engine:
        engine = engines.get(name)
        if isinstance(engine, ReplicatedEngine):  # every replica unloads, or 409 when one is synthesizing
            await asyncio.to_thread(engine.unload)
            return await asyncio.to_thread(describe_engine, engines, name)
        if not await asyncio.to_thread(engines.unload, name):
            raise Conflict(f"engine {name!r} is busy synthesizing; try again when it is idle", code="busy",
                           retry_after=BUSY_RETRY_AFTER_S)
        metrics.engine_loaded.labels(name).set(0)
        return describe_engine(engines, name)

    @get("/languages", opt={"scope": "any"}, summary="Languages and the engines that speak them",
         **documented(*auth_problems("any")))
    async def list_languages(self, engines: EngineManager) -> list[Language]:
        return await asyncio.to_thread(collect_languages, engines)


__all__ = ["EnginesController", "collect_languages", "describe_engine"]
