"""Operations: liveness, readiness, Prometheus metrics and the playground page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from litestar import Controller, MediaType, Response, get
from litestar.response import File

from tts_gateway import __version__
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.metrics import Metrics
from tts_gateway.errors import Unavailable
from tts_gateway.gateway.openapi import documented
from tts_gateway.gateway.responses import Health, Ready

STATIC = Path(__file__).parent.parent / "static"
PROMETHEUS_TEXT = "text/plain; version=0.0.4"
NOT_READY_RETRY_AFTER_S = 2


class OperationsController(Controller):
    path = "/"
    tags = ("operations",)

    @get("/health", summary="Liveness", **documented())
    async def health(self) -> Health:
        return Health(status="ok", version=__version__)

    @get("/ready", summary="200 when the default voice can be served now (canary passed at start, its engine "
                           "available) and the voice registry can be read; the detail says where each engine "
                           "stands", **documented(503))
    async def ready(self, dispatcher: Dispatcher) -> Ready:
        ok, detail = await asyncio.to_thread(dispatcher.check_ready)
        if not ok:
            raise Unavailable(detail, code="not-ready", title="Not ready", retry_after=NOT_READY_RETRY_AFTER_S)
        return Ready(status="ready", detail=detail)

    @get("/metrics", summary="Prometheus metrics", media_type=PROMETHEUS_TEXT, **documented())
    async def metrics(self, metrics: Metrics) -> Response[bytes]:
        return Response(metrics.render(), media_type=f"{PROMETHEUS_TEXT}; charset=utf-8")

    @get("/", include_in_schema=False)
    async def playground(self) -> File:
        return File(STATIC / "index.html", filename="index.html", content_disposition_type="inline",
                    media_type=MediaType.HTML)


__all__ = ["OperationsController"]
