"""OpenAI's streamed speech events: ``POST /v1/audio/speech`` with ``"stream_format": "sse"``.

The body is ``text/event-stream``; each event is one ``data:`` line of JSON whose ``type`` names it:

* ``{"type": "speech.audio.delta", "audio": <base64>}`` for each piece of the audio as it is made:
  the pieces, decoded and joined, are the bytes the raw stream (``"stream_format": "audio"``) sends;
* ``{"type": "speech.audio.done", "usage": {"input_tokens", "output_tokens", "total_tokens"}}`` last.
  No engine here counts tokens, so the counts are 0.

The status and headers leave before the audio is finished, so a synthesis that fails or times out
after its first audio cannot become an error status: the stream then ends with an ``error`` event in
the shape OpenAI's streams use (``{"type": "error", "error": {"type", "code", "message", "param"}}``,
which the ``openai`` SDK's stream reader raises as an `APIError`) instead of ``speech.audio.done``.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Reference, Schema

from tts_gateway.core.dispatch import Outcome

SSE_MEDIA_TYPE = "text/event-stream"
STREAM_FORMATS = ("audio", "sse")
SSE_HEADERS = {"Cache-Control": "no-cache"}
ENDED_EARLY = ("the synthesis stopped before the end of the audio: the engine failed or TTS_GATEWAY_TIMEOUT_S "
               "passed (the server log says which); the audio sent so far is incomplete")


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def speech_events(outcome: Outcome) -> AsyncIterator[bytes]:
    """The SSE body for ``outcome``: one delta per chunk of audio, then ``done`` (or ``error``)."""
    try:
        async for chunk in outcome.chunks():
            if chunk:
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")})
    finally:
        await outcome.close()  # a client that left stops the synthesis now, not when this is collected
    if outcome.complete:
        yield _event({"type": "speech.audio.done",
                      "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})
    else:
        yield _event({"type": "error", "error": {"type": "server_error", "code": "synthesis_ended_early",
                                                 "message": ENDED_EARLY, "param": None}})


def _object(description: str, **properties: Schema) -> Schema:
    fields: dict[str, Schema | Reference] = dict(properties)
    return Schema(type=OpenAPIType.OBJECT, description=description, properties=fields, required=sorted(fields))


def _constant(value: str) -> Schema:
    return Schema(type=OpenAPIType.STRING, enum=[value])


_TOKENS = Schema(type=OpenAPIType.INTEGER, minimum=0)
_EVENT = Schema(one_of=[
    _object("A piece of the audio, in the requested `response_format`",
            type=_constant("speech.audio.delta"), audio=Schema(type=OpenAPIType.STRING, content_encoding="base64")),
    _object("The last event of a stream that reached the end of the audio (token counts are 0 here)",
            type=_constant("speech.audio.done"),
            usage=_object("Token usage", input_tokens=_TOKENS, output_tokens=_TOKENS, total_tokens=_TOKENS)),
    _object("The last event of a stream whose synthesis failed or timed out after its first audio",
            type=_constant("error"),
            error=_object("What went wrong", type=Schema(type=OpenAPIType.STRING), code=Schema(type=OpenAPIType.STRING),
                          message=Schema(type=OpenAPIType.STRING), param=Schema(type=OpenAPIType.NULL))),
])
# The schema of one server-sent event (its fields), the way OpenAPI 3.2 describes event streams: the JSON
# in ``data`` is the part with a shape.
SSE_CONTENT = {SSE_MEDIA_TYPE: OpenAPIMediaType(schema=Schema(
    type=OpenAPIType.OBJECT, required=["data"],
    description="With `stream_format: sse`: one event per `data:` line of JSON",
    properties={"data": Schema(type=OpenAPIType.STRING, content_media_type="application/json", content_schema=_EVENT)},
))}


__all__ = ["SSE_CONTENT", "SSE_HEADERS", "SSE_MEDIA_TYPE", "STREAM_FORMATS", "speech_events"]
