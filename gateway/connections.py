"""Connections that cannot be held open for free: uvicorn's h11 protocol with read deadlines.

uvicorn bounds header size (``h11_max_incomplete_event_size``) and the idle time *between*
requests (``timeout_keep_alive``), but a client that opens a connection and sends nothing, or
trickles a request head a byte at a time, or stops half-way through a body, holds a connection
(and its buffer) for as long as it likes. Here:

* a request head (request line and headers) must be complete within ``head_timeout_s`` of its
  first byte, or of the connection's opening: otherwise 408 problem+json and the connection closes;
* a request body may pause for at most ``body_idle_s`` between chunks: otherwise the connection
  closes (the app sees a disconnect, so nothing is synthesized for a half-sent request).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tts_gateway.connections")

HEAD_TIMEOUT_S = 10.0
BODY_IDLE_S = 30.0


def _timeout_response(detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": "Request Timeout", "status": 408, "detail": detail}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with a deadline on each request head and an idle bound on each request body."""

    head_timeout_s = HEAD_TIMEOUT_S
    body_idle_s = BODY_IDLE_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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


__all__ = ["BODY_IDLE_S", "HEAD_TIMEOUT_S", "BoundedH11Protocol", "bounded_h11"]
