"""API keys with scopes (synthesize, voices, admin); compared in constant time, never logged."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from tts_gateway.config import ApiKey


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return connection.headers.get("x-api-key")


def match_key(keys: tuple[ApiKey, ...], presented: str) -> ApiKey | None:
    """Check every key (no early exit) so timing says nothing about which one matched."""
    found = None
    given = presented.encode()
    for key in keys:
        if hmac.compare_digest(key.key.encode(), given):
            found = key
    return found


def scope_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Litestar guard: the handler's ``opt["scope"]`` names the scope it needs ("any" = any key)."""
    keys: tuple[ApiKey, ...] = connection.app.state.settings.api_keys
    if not keys:
        return
    needed = handler.opt.get("scope")
    if needed is None:
        return
    presented = presented_key(connection)
    if not presented:
        raise NotAuthorizedException(
            detail="an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = match_key(keys, presented)
    if key is None:
        raise NotAuthorizedException(detail="the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    if needed != "any" and needed not in key.scopes:
        raise PermissionDeniedException(detail=f"this API key lacks the {needed!r} scope")


def auth_problems(scope: str) -> tuple[int, ...]:
    """The statuses `scope_guard` can answer on a route needing ``scope`` (with TTS_GATEWAY_API_KEYS set)."""
    return (401,) if scope == "any" else (401, 403)
