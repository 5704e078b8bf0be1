"""`create_app(settings, engine_manager)`: the Litestar application factory.

The routes live in `tts_gateway.gateway.controllers` (one controller per area); what they use is
injected from the app state (`tts_gateway.gateway.dependencies`). ``app.state.tts`` is the
`Dispatcher` (phrase cache, runner, admission, readiness), ``app.state.backend`` the optional Ray
backend, ``app.state.settings`` the settings the guard reads API keys from.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar

from tts_gateway.config import Settings
from tts_gateway.core.compose import Core, build_core
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.engines.manager import EngineManager
from tts_gateway.gateway.auth import scope_guard
from tts_gateway.gateway.controllers import CONTROLLERS
from tts_gateway.gateway.dependencies import DEPENDENCIES
from tts_gateway.gateway.openapi import FormSchemaPlugin, StrictStructSchemaPlugin, openapi_config, openapi_document
from tts_gateway.gateway.problems import EXCEPTION_HANDLERS
from tts_gateway.gateway.requests import SafeJSONRequest, answer_options, exact_path_guard

if TYPE_CHECKING:
    from tts_gateway.ray.backend import RayBackend


def create_app(settings: Settings, engine_manager: EngineManager | None = None, *,
               core: Core | None = None, backend: RayBackend | None = None) -> Litestar:
    """Build the app from settings (and, for tests, a ready engine manager, core or Ray backend).

    Resources are created here and released at shutdown (a given backend stays with its owner).
    """
    from tts_gateway.ray import make_backend  # None for TTS_GATEWAY_BACKEND=local

    backend = backend or make_backend(settings)
    if core is None:
        if backend is not None and engine_manager is None:
            # Ray mode: the engines here are stand-ins answering from what the replicas report; the
            # replicas hold the models and count the engine metrics (shown with a ``replica`` label).
            engine_manager = backend.engine_manager()
        core = build_core(settings, engines=engine_manager, engine_metrics=backend is None)
    if backend is not None:
        from tts_gateway.ray.board import REPLICA_METRICS

        backend.use_registry(core.registry)
        core.metrics.add_remote(backend.metric_texts, REPLICA_METRICS, label="replica")
    dispatcher = Dispatcher(core, runner=backend)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.close()

    app = Litestar(
        route_handlers=[*CONTROLLERS, openapi_document],
        dependencies=DEPENDENCIES,
        guards=[scope_guard, exact_path_guard],
        before_request=answer_options,
        request_class=SafeJSONRequest,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        request_max_body_size=settings.max_upload_bytes,
        openapi_config=openapi_config(),
        plugins=[StrictStructSchemaPlugin(), FormSchemaPlugin()],
        debug=False,
    )
    app.state.tts = dispatcher
    app.state.backend = backend  # started by `tts-gateway serve` on the main thread, before uvicorn
    app.state.settings = settings
    app.state.started_at = time.time()
    return app


__all__ = ["create_app"]
