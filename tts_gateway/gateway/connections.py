"""Connections that cannot be held open for free: uvicorn's h11 protocol with read deadlines.

uvicorn bounds header size (``h11_max_incomplete_event_size``) and the idle time *between*
requests (``timeout_keep_alive``), but a client that opens a connection and sends nothing, or
trickles a request head a byte at a time, or stops half-way through a body, holds a connection
(and its buffer) for as long as it likes. Here:

* a request head (request line and headers) must be complete within ``head_timeout_s`` of its
  first byte, or of the connection's opening: otherwise 408 problem+json and the connection closes;
* a request body may pause for at most ``body_idle_s`` between chunks: otherwise the connection
  closes (the app sees a disconnect, so nothing is synthesized for a half-sent request).

Framing is read one way only (RFC 9112 §6.1; h11 would take ``Transfer-Encoding`` over
``Content-Length`` and read whatever follows the chunked body as the next request, which a proxy
reading the other header would not): a request with both, or with ``Transfer-Encoding`` on
HTTP/1.0, gets 400 and the connection closes before its body is read. A version other than
HTTP/1.0 or 1.1 gets 505. These and h11's own refusals answer problem+json, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # uvicorn's own default, imported as it does
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tts_gateway.connections")

HEAD_TIMEOUT_S = 10.0
BODY_IDLE_S = 30.0


def _problem_body(status: int, detail: str) -> bytes:
    return json.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                       "detail": detail}).encode()


def _timeout_response(detail: str) -> bytes:
    body = _problem_body(408, detail)
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


def framing_problem(request: h11.Request) -> tuple[int, str] | None:
    """(status, detail) when a request head is one this server refuses to read a body after, else None."""
    version = request.http_version.decode("ascii", "replace")
    if version not in ("1.0", "1.1"):
        return 505, f"this server speaks HTTP/1.0 and HTTP/1.1, not HTTP/{version}"
    names = {name.lower() for name, _value in request.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return 400, ("a request with both Content-Length and Transfer-Encoding has two framings (RFC 9112 §6.1); "
                     "send one of them")
    if b"transfer-encoding" in names and version == "1.0":
        return 400, "HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1); send Content-Length, or use HTTP/1.1"
    return None


class StrictConnection(h11.Connection):
    """h11's connection that refuses the request heads `framing_problem` names, and keeps why it refused."""

    rejection: tuple[int, str] | None = None

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            self.rejection = (exc.error_status_hint, f"the request is not valid HTTP/1.1: {exc}")
            raise
        if isinstance(event, h11.Request):
            problem = framing_problem(event)
            if problem is not None:
                self.rejection = problem
                # uvicorn answers a RemoteProtocolError (see `send_400_response`) and closes the connection.
                raise h11.RemoteProtocolError(problem[1], error_status_hint=problem[0])
        return event


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with a deadline on each request head and an idle bound on each request body."""

    head_timeout_s = HEAD_TIMEOUT_S
    body_idle_s = BODY_IDLE_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.conn = StrictConnection(h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)
        self._read_timer: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # "head" | "body" | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn calls for a request h11 (or `StrictConnection`) refuses: a problem, then close."""
        rejection = self.conn.rejection if isinstance(self.conn, StrictConnection) else None
        status, detail = rejection or (400, msg)
        body = _problem_body(status, detail)
        headers = [(b"content-type", b"application/problem+json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # a response had already begun: nothing more can be said on it
            pass
        self.transport.close()

    def _watch(self) -> None:
        """(Re)arm the read timer for what the connection is waiting for from the client."""
        if self.transport is None or self.transport.is_closing():
            self._cancel_read_timer()
            return
        state = self.conn.their_state
        if state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            # Between requests with nothing received yet, uvicorn's keep-alive timer is the bound.
            if self.timeout_keep_alive_task is not None:
                self._cancel_read_timer()
            elif self._waiting_for != "head":  # the deadline runs from the head's first byte: never re-armed
                self._arm("head", self.head_timeout_s)
        elif state is h11.SEND_BODY:
            self._arm("body", self.body_idle_s)  # re-armed on every chunk: an idle bound
        else:
            self._cancel_read_timer()

    def _arm(self, what: str, seconds: float) -> None:
        self._cancel_read_timer()
        self._waiting_for = what
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer, self._waiting_for = None, None

    def _read_timed_out(self) -> None:
        what, self._read_timer, self._waiting_for = self._waiting_for, None, None
        if self.transport is None or self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if what == "head":
            log.warning("%s sent no complete request head within %g s: closed (408)", client, self.head_timeout_s)
            self.transport.write(_timeout_response(
                f"the request line and headers must arrive within {self.head_timeout_s:g} s"))
        else:
            log.warning("%s paused its request body for %g s: closed", client, self.body_idle_s)
        self.transport.close()


def bounded_h11(head_timeout_s: float = HEAD_TIMEOUT_S, body_idle_s: float = BODY_IDLE_S) -> type[H11Protocol]:
    """A `BoundedH11Protocol` class with these bounds, for ``uvicorn.Config(http=...)``."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"head_timeout_s": head_timeout_s, "body_idle_s": body_idle_s})


__all__ = ["BODY_IDLE_S", "HEAD_TIMEOUT_S", "BoundedH11Protocol", "StrictConnection", "bounded_h11", "framing_problem"]
