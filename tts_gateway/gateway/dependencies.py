"""What controllers get injected: the dispatcher and the core's services, read from the app's state.

`create_app` puts the `Dispatcher` at ``app.state.tts``; every provider here reads it from there,
so handlers declare what they use by parameter name (``service: SynthesisService``) and nothing is a
module global.

A dependency name must not be the name of a request field or parameter: Litestar reports a
validation error on a field whose name is also a dependency as a 500 (a body with ``"cache": {}`` did).
"""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.di import Provide

from tts_gateway.config import Settings
from tts_gateway.core.dispatch import Dispatcher, Readiness
from tts_gateway.core.metrics import Metrics
from tts_gateway.core.phrase_cache import PhraseCache
from tts_gateway.core.service import SynthesisService
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import Unavailable
from tts_gateway.voices.catalog import VoiceCatalog


def provide_dispatcher(state: State) -> Dispatcher:
    dispatcher: Dispatcher = state.tts
    return dispatcher


def provide_service(state: State) -> SynthesisService:
    return provide_dispatcher(state).core.service


def provide_voices(state: State) -> VoiceCatalog:
    return provide_dispatcher(state).core.voices


def provide_engines(state: State) -> EngineManager:
    return provide_dispatcher(state).core.engines


def provide_settings(state: State) -> Settings:
    return provide_dispatcher(state).core.settings


def provide_metrics(state: State) -> Metrics:
    return provide_dispatcher(state).core.metrics


def provide_readiness(state: State) -> Readiness:
    return provide_dispatcher(state).readiness


def provide_cache(state: State) -> PhraseCache:
    cache = provide_dispatcher(state).cache
    if cache is None:  # the app always opens one; a core built without it has no cache to report
        raise Unavailable("the phrase cache is not open in this process")
    return cache


DEPENDENCIES: dict[str, Any] = {
    "dispatcher": Provide(provide_dispatcher, sync_to_thread=False),
    "service": Provide(provide_service, sync_to_thread=False),
    "voices": Provide(provide_voices, sync_to_thread=False),
    "engines": Provide(provide_engines, sync_to_thread=False),
    "settings": Provide(provide_settings, sync_to_thread=False),
    "metrics": Provide(provide_metrics, sync_to_thread=False),
    "readiness": Provide(provide_readiness, sync_to_thread=False),
    "phrase_cache": Provide(provide_cache, sync_to_thread=False),
}

__all__ = ["DEPENDENCIES"]
