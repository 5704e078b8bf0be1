"""The Wyoming server: the wyoming library's `AsyncServer` on the gateway's shared `Dispatcher`.

It runs on the HTTP server's event loop, in the same process, so both edges share engines, the
voice registry, admission control, the phrase cache and metrics. `alongside` wires it into the ASGI
lifespan: it starts once the app has started (the dispatcher is running) and drains before the app
shuts down (the dispatcher closes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlparse

from wyoming.server import AsyncServer

from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.wyoming.handler import GatewayHandler
from tts_gateway.wyoming.metrics import WyomingMetrics

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class WyomingServer:
    """Serves Wyoming (Home Assistant's protocol) at ``uri`` (``tcp://HOST:PORT``) on ``dispatcher``.

    There is no authentication on Wyoming (Home Assistant's local trust model): anyone who can
    reach the port can list voices and synthesize, so a non-loopback address is logged as a warning.
    """

    def __init__(self, dispatcher: Dispatcher, uri: str) -> None:
        self.dispatcher = dispatcher
        self.uri = uri
        self.metrics = WyomingMetrics.of(dispatcher.core.metrics)
        self.closing = False
        self.handlers: set[GatewayHandler] = set()
        self._server: AsyncServer | None = None
        self._idle = asyncio.Event()
        self._closing_since: float | None = None

    # -- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and serve in the background; raises OSError when the address is taken."""
        server = AsyncServer.from_uri(self.uri)
        await server.start(self._connect)
        self._server = server
        host = urlparse(self.uri).hostname or ""
        log.info("Wyoming (Home Assistant) server on %s", self.uri)
        if not is_loopback(host):
            log.warning("Wyoming on %s has no authentication: anyone who can reach this port can list voices and "
                        "synthesize%s. Bind it to 127.0.0.1 or keep the port behind a firewall.", self.uri,
                        " (TTS_GATEWAY_API_KEYS does not apply to it)" if self.dispatcher.core.settings.api_keys
                        else "")

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (with an error event); running ones go on."""
        if not self.closing:
            self.closing = True
            self._closing_since = time.monotonic()
            self.request_done()

    async def stop(self, grace_s: float) -> None:
        """Drain: refuse new requests, let running ones finish for up to ``grace_s`` seconds (counted from
        `begin_shutdown`), then cancel what is left and close every connection."""
        self.begin_shutdown()
        assert self._closing_since is not None
        deadline = self._closing_since + grace_s
        while True:
            self._idle.clear()  # before looking, so a request that ends meanwhile still wakes the wait
            busy = sum(h.busy for h in self.handlers)
            if not busy:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("Wyoming: cancelling the requests of %d connection(s) still running after %g s",
                            busy, grace_s)
                break
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                pass
        server, self._server = self._server, None
        if server is not None:
            await server.stop()  # closes the listener and every connection; each handler cancels its work
        handlers = [asyncio.ensure_future(h.finished.wait()) for h in list(self.handlers)]
        if handlers:
            await asyncio.wait(handlers, timeout=10)
            for waiter in handlers:
                waiter.cancel()

    # -- handlers ----------------------------------------------------------------------------------
    def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> GatewayHandler:
        handler = GatewayHandler(reader, writer, self)
        self.handlers.add(handler)
        self.metrics.connections.set(len(self.handlers))
        return handler

    def forget(self, handler: GatewayHandler) -> None:
        self.handlers.discard(handler)
        self.metrics.connections.set(len(self.handlers))
        self.request_done()

    def request_done(self) -> None:
        self._idle.set()


def alongside(app: Callable[..., Awaitable[None]], wyoming: WyomingServer, *, grace_s: float,
              should_exit: Callable[[], bool] | None = None) -> ASGIApp:
    """``app`` with ``wyoming`` started after the app's start-up and drained before its shutdown.

    ``should_exit`` (the HTTP server's "a signal came" flag) is watched, so Wyoming refuses new
    requests from the moment SIGTERM arrives while both edges drain. A Wyoming address that cannot
    be bound fails the start-up with the reason, after the app has shut down cleanly.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        watcher: asyncio.Task[None] | None = None
        failure: str | None = None

        async def watch() -> None:
            assert should_exit is not None
            while not should_exit():
                await asyncio.sleep(0.1)
            wyoming.begin_shutdown()

        async def lifespan_receive() -> Message:
            if failure is not None:  # Wyoming could not start: shut the app down again at once
                return {"type": "lifespan.shutdown"}
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                if watcher is not None:
                    watcher.cancel()
                await wyoming.stop(grace_s)
            return message

        async def lifespan_send(message: Message) -> None:
            nonlocal watcher, failure
            if message["type"] == "lifespan.startup.complete":
                try:
                    await wyoming.start()
                except (OSError, ValueError) as exc:
                    failure = f"cannot serve Wyoming on {wyoming.uri}: {exc}"
                    return
                if should_exit is not None:
                    watcher = asyncio.create_task(watch(), name="wyoming shutdown watch")
            elif failure is not None and message["type"].startswith("lifespan.shutdown."):
                message = {"type": "lifespan.startup.failed", "message": failure}
            await send(message)

        await app(scope, lifespan_receive, lifespan_send)

    return wrapped
