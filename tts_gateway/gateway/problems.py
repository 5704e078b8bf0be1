"""Every error leaves as application/problem+json ``{type, title, status, detail}``; never a trace."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from tts_gateway.errors import TTSGatewayError

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
MULTIPART_PART_LIMIT = 1000  # Litestar's default multipart_form_part_limit
TYPE_BASE = "https://tts-gateway.dev/problems/"
# 503s always tell the client when to come back, even if the error did not say.
DEFAULT_RETRY_AFTER_S = 5


class ProblemDetails(msgspec.Struct):
    """RFC 9457 problem document: every error response has this shape (some add members)."""

    type: str
    title: str
    status: int
    detail: str


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
        body.update({key: value for key, value in extra.items() if key not in body})
    headers = dict(headers or {})
    if status == 503 and not any(key.lower() == "retry-after" for key in headers):
        headers["Retry-After"] = str(DEFAULT_RETRY_AFTER_S)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


# The one place a kind of error becomes an HTTP status.
STATUS_OF_KIND: dict[str, int] = {
    "not_found": 404,
    "conflict": 409,
    "invalid": 422,
    "unsupported_media": 415,
    "too_large": 413,
    "unavailable": 503,
    "timed_out": 504,
    "cancelled": 499,
    "internal": 500,
}


def status_of(exc: TTSGatewayError) -> int:
    return STATUS_OF_KIND.get(exc.kind, 500)


# What each documented error status means on this API (the OpenAPI descriptions).
PROBLEM_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: the body is not valid JSON or multipart",
    401: "No API key, or an unknown one (only when TTS_GATEWAY_API_KEYS is set)",
    403: "The API key lacks the scope this route needs",
    404: "Unknown voice, engine or route",
    409: "Conflict: the name exists, the voice is broken or read-only, or the engine is busy",
    413: "The body is larger than its limit: TTS_GATEWAY_MAX_UPLOAD_BYTES for uploads, a size derived from "
         "TTS_GATEWAY_MAX_TEXT_CHARS for JSON",
    415: "Wrong content type, or an upload that is not audio",
    422: "A field is invalid (empty or too long text, a language the engine lacks, bad format, speed, rate...)",
    500: "Internal error; the server log has the details",
    503: "Engine unavailable, server busy or not ready; retry after Retry-After seconds",
    504: "The synthesis took longer than TTS_GATEWAY_TIMEOUT_S",
}


def problem_responses(statuses: Iterable[int]) -> dict[int, ResponseSpec]:
    """OpenAPI ``responses=`` for a route: each status as an application/problem+json `ProblemDetails`."""
    return {
        status: ResponseSpec(data_container=ProblemDetails, media_type=PROBLEM_JSON, generate_examples=False,
                             description=PROBLEM_DESCRIPTIONS.get(status, HTTPStatus(status).phrase))
        for status in sorted(set(statuses))
    }


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
    elif exc.status_code == 400 and detail == "Request Entity Too Large":
        # Litestar's multipart parser says this when a form has more parts than it allows.
        return problem(413, f"the form has too many parts: at most {MULTIPART_PART_LIMIT} fields and files "
                            "are read", kind="too-many-parts", title="Too many form parts")
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
