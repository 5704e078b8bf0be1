"""Domain errors shared by the service layer; the gateway maps each to one HTTP problem."""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    title = "Internal error"
    type_suffix = "internal"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidField(GatewayError):
    status = 422
    title = "Invalid field"
    type_suffix = "invalid-field"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


class NotFound(GatewayError):
    status = 404
    title = "Not found"
    type_suffix = "not-found"


class Conflict(GatewayError):
    status = 409
    title = "Conflict"
    type_suffix = "conflict"


class Unavailable(GatewayError):
    status = 503
    title = "Service unavailable"
    type_suffix = "unavailable"

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class TimedOut(GatewayError):
    status = 504
    title = "Synthesis timed out"
    type_suffix = "timeout"


class UnsupportedMedia(GatewayError):
    status = 415
    title = "Unsupported media type"
    type_suffix = "unsupported-media-type"
