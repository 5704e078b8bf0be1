"""Every error leaves as application/problem+json ``{type, title, status, detail}``; never a trace."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from engines.base import EngineUnavailable, InvalidReferenceAudio, UnsupportedLanguage
from tts_gateway.errors import GatewayError

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tts-gateway.dev/problems/"


def problem(status: int, detail: str, *, kind: str | None = None, title: str | None = None,
            headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> Response[Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {
        "type": TYPE_BASE + (kind or phrase.lower().replace(" ", "-")),
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers or {})


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
    return problem(exc.status, exc.detail, kind=exc.type_suffix, title=exc.title, headers=exc.headers)


def _reference_audio(_: Request[Any, Any, Any], exc: InvalidReferenceAudio) -> Response[Any]:
    if exc.not_audio:
        return problem(415, exc.detail, kind="not-audio", title="Not audio")
    return problem(422, exc.detail, kind="invalid-reference-audio", title="Invalid reference audio")


def _unsupported_language(_: Request[Any, Any, Any], exc: UnsupportedLanguage) -> Response[Any]:
    return problem(422, str(exc), kind="unsupported-language", title="Unsupported language",
                   extra={"languages": exc.available})


def _engine_unavailable(_: Request[Any, Any, Any], exc: EngineUnavailable) -> Response[Any]:
    return problem(503, str(exc), kind="engine-unavailable", title="Engine unavailable",
                   headers={"Retry-After": "30"})


def _validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    detail = str(exc.detail)
    messages = []
    if isinstance(exc.extra, list):
        for item in exc.extra:
            if isinstance(item, dict):
                key = item.get("key")
                text = item.get("message", "")
                messages.append(f"{key}: {text}" if key else str(text))
    text = "; ".join(messages) or detail
    lowered = f"{detail} {text}".lower()
    if "malformed" in lowered or ("decode" in lowered and "json" in lowered):
        return problem(400, f"malformed request body (not valid JSON): {text}", kind="malformed",
                       title="Malformed request")
    return problem(422, text, kind="invalid-field", title="Invalid field")


def _http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = "nothing here: no route matches this path (see /docs)"
    elif exc.status_code == 405:
        detail = f"method not allowed here; {detail}"
    elif exc.status_code == 413:
        detail = "request body is larger than the limit (TTS_GATEWAY_MAX_UPLOAD_BYTES)"
    elif exc.status_code == 400 and "out of range" in detail.lower():
        # msgspec refuses 1e999 and friends while parsing: a bad value, not bad JSON.
        return problem(422, f"invalid field: {detail}", kind="invalid-field", title="Invalid field")
    elif exc.status_code == 400:
        return problem(400, f"malformed request body: {detail}", kind="malformed", title="Malformed request")
    return problem(exc.status_code, detail, headers=headers)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal error; the server log has the details", kind="internal")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: _gateway_error,
    InvalidReferenceAudio: _reference_audio,
    UnsupportedLanguage: _unsupported_language,
    EngineUnavailable: _engine_unavailable,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _internal,
}
