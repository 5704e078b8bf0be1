"""From a synthesis `Plan` to an HTTP response: whole audio or a chunked stream, counted in metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar import Response
from litestar.response import Stream

from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import Plan
from tts_gateway.errors import TTSGatewayError
from tts_gateway.gateway.problems import status_of


async def respond(dispatcher: Dispatcher, plan: Plan, headers: Mapping[str, str] | None = None) -> Response[Any]:
    """Run ``plan`` and answer with audio; counts ``tts_requests_total{engine,status}``.

    Args:
        dispatcher: The phrase cache and runner.
        plan: A validated synthesis.
        headers: More response headers (e.g. a note that a request field was ignored).
    """
    metrics = dispatcher.core.metrics
    try:
        outcome = await dispatcher.run(plan)
    except TTSGatewayError as exc:
        metrics.requests.labels(plan.engine_name, str(status_of(exc))).inc()
        raise
    except Exception:
        metrics.requests.labels(plan.engine_name, "500").inc()
        raise
    metrics.requests.labels(plan.engine_name, "200").inc()
    all_headers = {**outcome.headers, **(headers or {})}
    if outcome.audio is not None and not plan.streams:
        return Response(outcome.audio, media_type=outcome.media_type, headers=all_headers)
    return Stream(outcome.chunks(), media_type=outcome.media_type, headers=all_headers)


__all__ = ["respond"]
