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

from litestar import Litestar

from tts_gateway.config import Settings
from tts_gateway.core.compose import Core, build_core
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.engines.manager import EngineManager
from tts_gateway.gateway.auth import scope_guard
from tts_gateway.gateway.controllers import CONTROLLERS
from tts_gateway.gateway.dependencies import DEPENDENCIES
from tts_gateway.gateway.openapi import FormSchemaPlugin, StrictStructSchemaPlugin, openapi_config
from tts_gateway.gateway.problems import EXCEPTION_HANDLERS
from tts_gateway.gateway.requests import SafeJSONRequest, answer_options


def create_app(settings: Settings, engine_manager: EngineManager | None = None, *,
               core: Core | None = None) -> Litestar:
    """Build the app from settings (and, for tests, a ready engine manager or core).

    Resources are created here and released at shutdown.
    """
    from tts_gateway.ray import make_backend  # None for TTS_GATEWAY_BACKEND=local

    core = core or build_core(settings, engines=engine_manager)
    backend = make_backend(settings, core.registry)
    dispatcher = Dispatcher(core, runner=backend)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.close()

    app = Litestar(
        route_handlers=CONTROLLERS,
        dependencies=DEPENDENCIES,
        guards=[scope_guard],
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
