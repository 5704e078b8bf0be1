"""Every error leaves as application/problem+json ``{type, title, status, detail}``; never a trace."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from tts_gateway.errors import TTSGatewayError

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


# The one place a kind of error becomes an HTTP status.
STATUS_OF_KIND: dict[str, int] = {
    "not_found": 404,
    "conflict": 409,
    "invalid": 422,
    "unsupported_media": 415,
    "unavailable": 503,
    "timed_out": 504,
    "cancelled": 499,
    "internal": 500,
}


def status_of(exc: TTSGatewayError) -> int:
    return STATUS_OF_KIND.get(exc.kind, 500)


def _domain_error(_: Request[Any, Any, Any], exc: TTSGatewayError) -> Response[Any]:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return problem(status_of(exc), exc.detail, kind=exc.code, title=exc.title, headers=headers,
                   extra=exc.extra or None)


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
    TTSGatewayError: _domain_error,
    ValidationException: _validation,
    HTTPException: _http,
    Exception: _internal,
}
