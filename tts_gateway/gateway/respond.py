"""From a synthesis `Plan` to an HTTP response: whole audio or a chunked stream, counted in metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from contextlib import suppress
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.response import Stream

from tts_gateway.core.dispatch import Dispatcher, Outcome
from tts_gateway.core.service import Plan
from tts_gateway.errors import Cancelled, TTSGatewayError
from tts_gateway.gateway.problems import status_of

T = TypeVar("T")


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Returns when the client goes away (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(work: Awaitable[T], request: Request[Any, Any, Any]) -> T:
    """``work``, cancelled as soon as the client disconnects (the engine stops at its next chunk)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()  # the runner sets the request's cancel event and frees its slot when the worker stops
        with suppress(asyncio.CancelledError, Exception):
            await task
        raise Cancelled("the client went away before the audio was ready; the synthesis was stopped")
    finally:
        watcher.cancel()


async def outcome_of(dispatcher: Dispatcher, plan: Plan, request: Request[Any, Any, Any] | None = None) -> Outcome:
    """Run ``plan``; counts ``tts_requests_total{engine,status}``.

    Args:
        dispatcher: The phrase cache and runner.
        plan: A validated synthesis.
        request: The HTTP request: a whole-audio synthesis stops when its client disconnects (a stream
            stops by itself when its body can no longer be sent).
    """
    if request is not None and not plan.streams:
        return await counted(dispatcher, plan, unless_client_leaves(dispatcher.run(plan), request))
    return await counted(dispatcher, plan, dispatcher.run(plan))


async def counted(dispatcher: Dispatcher, plan: Plan, work: Awaitable[T]) -> T:
    """``work`` (the start of a synthesis), counted in ``tts_requests_total{engine,status}`` by how it ends."""
    metrics = dispatcher.core.metrics
    try:
        result = await work
    except TTSGatewayError as exc:
        metrics.requests.labels(plan.engine_name, str(status_of(exc))).inc()
        raise
    except Exception:
        metrics.requests.labels(plan.engine_name, "500").inc()
        raise
    metrics.requests.labels(plan.engine_name, "200").inc()
    return result


async def respond(dispatcher: Dispatcher, plan: Plan, headers: Mapping[str, str] | None = None,
                  request: Request[Any, Any, Any] | None = None) -> Response[Any]:
    """Run ``plan`` (see `outcome_of`) and answer with audio, whole or as a chunked stream.

    ``headers`` are more response headers (e.g. a note that a request field was ignored).
    """
    outcome = await outcome_of(dispatcher, plan, request)
    all_headers = {**outcome.headers, **(headers or {})}
    if outcome.audio is not None and not plan.streams:
        return Response(outcome.audio, media_type=outcome.media_type, headers=all_headers)
    return Stream(outcome.chunks(), media_type=outcome.media_type, headers=all_headers)


__all__ = ["counted", "outcome_of", "respond", "unless_client_leaves"]
