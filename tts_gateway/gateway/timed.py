"""Timed answers of ``POST /v1/synthesize``: JSON with base64 audio and its timings, or server-sent events.

A stream sends ``audio`` events as the audio is made — each with its base64 bytes (possibly none: a
sentence's timings come when it ends, and FLAC/MP3 are encoded at the end) and the words and sentences
heard in it — then one ``done`` event with every timing, the duration and the captions.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response
from litestar.response import Stream

from tts_gateway.core.captions import render
from tts_gateway.core.dispatch import Dispatcher, TimedOutcome
from tts_gateway.core.service import Plan
from tts_gateway.core.timings import Timings, as_dict
from tts_gateway.engines.timing import WORD
from tts_gateway.gateway.respond import counted, unless_client_leaves

EVENT_STREAM = "text/event-stream"


def summary(plan: Plan, timings: Timings) -> dict[str, Any]:
    """What a timed answer says besides its audio."""
    body: dict[str, Any] = {"format": plan.fmt.name, "sample_rate": plan.rate,
                            **timings.as_dict(plan.timestamps == WORD)}
    if plan.captions is not None:
        body["captions"] = render(plan.captions, timings.sentences, timings.words)
    return body


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _events(plan: Plan, outcome: TimedOutcome) -> AsyncIterator[bytes]:
    timings = Timings()
    words = plan.timestamps == WORD
    async for item in outcome.items():
        timings.add(item)
        if not (item.audio or item.words or item.sentences):
            continue
        data: dict[str, Any] = {"audio": base64.b64encode(item.audio).decode("ascii"),
                                "sentences": [as_dict(span) for span in item.sentences]}
        if words:
            data["words"] = [as_dict(word) for word in item.words]
        yield _event("audio", data)
    yield _event("done", summary(plan, timings))


async def run_timed(dispatcher: Dispatcher, plan: Plan, request: Request[Any, Any, Any]) -> TimedOutcome:
    """Run a plan with ``timestamps`` (stopped when a whole answer's client leaves); counts
    ``tts_requests_total{engine,status}``."""
    work = dispatcher.run_timed(plan)
    return await counted(dispatcher, plan, work if plan.stream else unless_client_leaves(work, request))


async def respond_timed(dispatcher: Dispatcher, plan: Plan, request: Request[Any, Any, Any]) -> Response[Any]:
    """Run a plan with ``timestamps`` and answer with JSON or, when it streams, server-sent events."""
    outcome = await run_timed(dispatcher, plan, request)
    if plan.stream:
        return Stream(_events(plan, outcome), media_type=EVENT_STREAM,
                      headers={**outcome.headers, "Cache-Control": "no-cache"})
    assert outcome.audio is not None and outcome.timings is not None
    body = {"audio": base64.b64encode(outcome.audio).decode("ascii"), **summary(plan, outcome.timings)}
    return Response(body, media_type="application/json", headers=outcome.headers)


__all__ = ["respond_timed", "run_timed"]
