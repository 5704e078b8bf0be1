"""One error hierarchy for every layer.

`TTSGatewayError` is the root; five kinds (plus `UnsupportedMedia` and `Cancelled`) say what went
wrong in terms any edge understands. Engine, voice and registry errors subclass a kind; the HTTP
edge maps kinds to status codes in one place (`tts_gateway.gateway.problems`), the CLI prints the
detail, and the Ray path carries ``to_dict()`` across the process boundary and rebuilds the same
kind with `from_dict` — never a status code.

This module imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TTSGatewayError(Exception):
    """Root of every error the gateway reports to a client.

    Args:
        detail: A sentence for the client; never a stack trace.
        code: A stable machine-readable name (the problem ``type`` suffix), e.g. ``unsupported-language``.
        title: A short human title; the kind's title by default.
        retry_after: Seconds a client should wait before retrying (for `Unavailable`).
        field: The request field at fault (for `Invalid`).
        extra: Extra JSON members for the problem document.
    """

    kind: ClassVar[str] = "internal"
    default_code: ClassVar[str] = "internal"
    default_title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, code: str | None = None, title: str | None = None,
                 retry_after: int | None = None, field: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.title = title or self.default_title
        self.retry_after = retry_after
        self.field = field
        self.extra = dict(extra or {})

    def to_dict(self) -> dict[str, Any]:
        """Plain values that rebuild an error of the same kind in another process."""
        return {"kind": self.kind, "detail": self.detail, "code": self.code, "title": self.title,
                "retry_after": self.retry_after, "field": self.field, "extra": self.extra}

    @staticmethod
    def from_dict(values: dict[str, Any]) -> TTSGatewayError:
        cls = KINDS.get(str(values.get("kind")), TTSGatewayError)
        return cls(str(values.get("detail", "")), code=values.get("code"), title=values.get("title"),
                   retry_after=values.get("retry_after"), field=values.get("field"), extra=values.get("extra"))


class NotFound(TTSGatewayError, LookupError):
    kind = "not_found"
    default_code = "not-found"
    default_title = "Not found"


class Conflict(TTSGatewayError):
    kind = "conflict"
    default_code = "conflict"
    default_title = "Conflict"


class Invalid(TTSGatewayError, ValueError):
    """A value the client sent is not acceptable; ``field`` names it."""

    kind = "invalid"
    default_code = "invalid-field"
    default_title = "Invalid field"


class InvalidField(Invalid):
    """`Invalid`, with the field named first in the detail: ``speed: must be between 0.25 and 4``."""

    def __init__(self, field: str, detail: str, **kwargs: Any) -> None:
        super().__init__(f"{field}: {detail}", field=field, **kwargs)


class UnsupportedMedia(TTSGatewayError):
    """The body or an upload is of a type the gateway cannot read (not audio, wrong content type)."""

    kind = "unsupported_media"
    default_code = "unsupported-media-type"
    default_title = "Unsupported media type"


class TooLarge(TTSGatewayError):
    """A body or a part of it is larger than its limit (the detail names the limit)."""

    kind = "too_large"
    default_code = "too-large"
    default_title = "Request too large"


class Unavailable(TTSGatewayError):
    """The work cannot be done now (engine unavailable, server busy, storage down); retry later."""

    kind = "unavailable"
    default_code = "unavailable"
    default_title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int | None = 5, **kwargs: Any) -> None:
        super().__init__(detail, retry_after=retry_after, **kwargs)


class TimedOut(TTSGatewayError):
    kind = "timed_out"
    default_code = "timeout"
    default_title = "Synthesis timed out"


class Cancelled(TTSGatewayError):
    """The request went away or timed out, and the work stopped early."""

    kind = "cancelled"
    default_code = "cancelled"
    default_title = "Cancelled"


KINDS: dict[str, type[TTSGatewayError]] = {
    cls.kind: cls for cls in (TTSGatewayError, NotFound, Conflict, Invalid, UnsupportedMedia, TooLarge,
                              Unavailable, TimedOut, Cancelled)
}

__all__ = ["KINDS", "Cancelled", "Conflict", "Invalid", "InvalidField", "NotFound", "TTSGatewayError", "TimedOut",
           "TooLarge", "Unavailable", "UnsupportedMedia"]
