"""Request-side hooks: paths matched as sent, content-type checks before a body is parsed, and JSON
decoding that never 500s."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import msgspec
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException, SerializationException
from litestar.handlers.base import BaseRouteHandler
from litestar.status_codes import HTTP_204_NO_CONTENT
from litestar.types import Empty

from tts_gateway.errors import Invalid, InvalidField, NotFound, TooLarge, UnsupportedMedia


def exact_path_guard(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
    """App guard: a path with a ``{name}`` in it matches only as sent.

    Litestar routes on the decoded path with trailing and doubled slashes dropped, so
    ``/v1/voices/anna%2F``, ``/v1/voices/anna/`` and ``/v1//voices/anna`` would all reach the voice
    ``anna``, and ``POST /v1/engines/piper%2Fload`` the load route. No name holds a slash: such a path
    is a 404 like any other that names nothing. Fixed paths keep Litestar's lenient trailing slash.
    """
    template = str(connection.scope.get("path_template", ""))
    raw_path = connection.scope.get("raw_path")
    if "{" not in template or ":path}" in template or not raw_path:
        return
    raw = raw_path.decode("latin-1").partition("?")[0]  # a test client's raw path may carry the query
    root = str(connection.scope.get("root_path", ""))
    if root and raw.startswith(root):
        raw = raw[len(root):]
    sent = [unquote(segment) for segment in raw.split("/")]
    if len(sent) != template.count("/") + 1 or any("/" in segment for segment in sent):
        raise NotFound("nothing here: no route matches this path (a name cannot hold '/', and a path does not "
                       "end with one)")


def _mime(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


_NON_FINITE = re.compile(rb'"([^"\\]{1,64})"\s*:\s*-?(?:NaN|Infinity)\b')


_AT_PATH = re.compile(r"^(?P<message>.*) - at `\$\.(?P<field>[^`]+)`$", re.DOTALL)


def json_body(kind: type[Any]) -> Callable[[Request[Any, Any, Any]], Awaitable[None]]:
    """before_request hook for a JSON route whose body is a ``kind`` Struct.

    Runs before Litestar parses the body: the wrong content type is a 415, and the body is checked
    against ``kind`` *strictly* (``"cache": 0`` or ``"speed": "2"`` is a 422, as the schema says;
    Litestar's own conversion would quietly coerce them). Malformed JSON is left to Litestar (400).
    """

    async def check(request: Request[Any, Any, Any]) -> None:
        mime = _mime(request)
        if not _is_json(mime):
            raise UnsupportedMedia(f"send the body as application/json, not {mime or 'no content type'}")
        body = await request.body()
        try:
            msgspec.json.decode(body, type=kind, strict=True)
        except msgspec.ValidationError as exc:
            located = _AT_PATH.match(str(exc))
            if located:
                raise InvalidField(located["field"], located["message"]) from None
            raise Invalid(str(exc)) from None
        except (msgspec.DecodeError, RecursionError):
            # Python's json module writes NaN/Infinity, which JSON lacks: a bad value (422), not bad
            # JSON. Looked for only when the body does not parse, so text that merely says "NaN" is fine.
            non_finite = _NON_FINITE.search(body)
            if non_finite:
                raise InvalidField(non_finite.group(1).decode(errors="replace"), "must be a finite number") from None
            return  # malformed: Litestar's parser reports it (400), as for any JSON route

    return check


async def require_multipart(request: Request[Any, Any, Any]) -> None:
    mime = _mime(request)
    if mime != "multipart/form-data":
        raise UnsupportedMedia(f"send the body as multipart/form-data, not {mime or 'no content type'}")
    try:
        await request.form()  # parsed here (and reused): Litestar lets charset errors escape as 500s
    except (UnicodeDecodeError, LookupError) as exc:
        raise ClientException(f"a form field is not valid text in its charset: {exc}") from None


async def answer_options(request: Request[Any, Any, Any]) -> Response[None] | None:
    """App-level before_request hook: ``OPTIONS`` answers with every method of the path in ``Allow``.

    Litestar's automatic OPTIONS handler lists only the methods of the first handler registered on a
    path (GET+POST ``/v1/voices`` answered ``Allow: OPTIONS, POST``); handlers with their own
    before_request hooks never see ``OPTIONS``, so this runs only for the automatic handler.
    """
    if request.method != "OPTIONS":
        return None
    handler = request.scope["route_handler"]
    table = request.app.route_handler_method_map
    methods = {method for path in handler.paths for method in table.get(path, {}) if method.isupper()}
    return Response(None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": ", ".join(sorted(methods))})


def json_body_limit(max_text_chars: int) -> int:
    """Bytes a JSON request body may have: the longest allowed text with every character written as
    an escaped surrogate pair (12 bytes), plus room for the other fields."""
    return 12 * max_text_chars + JSON_OVERHEAD_BYTES


JSON_OVERHEAD_BYTES = 16 * 1024


class SafeJSONRequest(Request[Any, Any, Any]):
    """JSON bodies bounded by a size made for text (not the upload limit), and JSON decode failures
    Litestar does not catch as 400s instead of 500s."""

    async def body(self) -> bytes:
        if self._body is Empty and self._connection_state.body is Empty and _is_json(_mime(self)):
            settings = getattr(self.app.state, "settings", None)
            if settings is not None:
                self._body = self._connection_state.body = await self._bounded_body(
                    json_body_limit(settings.max_text_chars))
        return await super().body()

    async def _bounded_body(self, limit: int) -> bytes:
        too_large = TooLarge(f"a JSON body is limited to {limit} bytes (room for TTS_GATEWAY_MAX_TEXT_CHARS characters "
                             "of text); send audio as multipart/form-data", code="body-too-large")
        if self.content_length is not None and self.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self) -> Any:
        try:
            return await super().json()
        except UnicodeDecodeError as exc:
            raise SerializationException(f"JSON is malformed: not UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise SerializationException("JSON is malformed: nested too deeply") from None


__all__ = ["SafeJSONRequest", "answer_options", "exact_path_guard", "json_body", "json_body_limit", "require_multipart"]
