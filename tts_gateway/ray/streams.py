"""Serve responses as the gateway's runner hands them on: awaited, iterated, cancelled.

A `DeploymentResponse` or `DeploymentResponseGenerator` is awaited with the gateway's timeout; the
rest of a stream is a `RemoteChunks` whose ``aclose()`` cancels the replica's work (client gone,
timeout) unless the stream ended. Failures are translated into the error kinds the edges map.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from tts_gateway.ray.wire import translate

log = logging.getLogger(__name__)


class RemoteChunks:
    """The rest of a stream (encoded bytes, or a timed stream's `TimedBytes`). ``aclose()`` — even before
    the first ``__anext__``, when an async generator's ``finally`` would never run — cancels the replica's
    work unless the stream ended."""

    def __init__(self, generator: Any, next_chunk: Callable[[], Any], finished: bool,
                 on_complete: Callable[[], None] | None, engine: str, timeout_s: float) -> None:
        self._generator = generator
        self._next = next_chunk
        self._done = finished
        self._on_complete = on_complete
        self._engine = engine
        self._timeout_s = timeout_s

    def __aiter__(self) -> RemoteChunks:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._next()
        except StopAsyncIteration:
            self._done = True
            if self._on_complete is not None:
                self._on_complete()
            raise
        except TimeoutError:  # headers are sent: end the stream early; the log says why
            log.error("stream ended early: no audio within %g s", self._timeout_s)
            await self.aclose()
            raise StopAsyncIteration from None
        except asyncio.CancelledError:
            await self.aclose()
            raise
        except Exception as exc:
            log.error("stream ended early: %s", translate(exc, self._engine))
            self._done = True  # it failed on the replica: nothing left to cancel
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            cancel(self._generator)  # client disconnect, timeout: stop the replica

    def __del__(self) -> None:
        if not self.__dict__.get("_done", True):
            self._done = True
            cancel(self._generator)


async def awaited(response: Any) -> Any:
    """A Serve response as a coroutine (``asyncio.wait_for`` wants one)."""
    return await response


async def next_of(generator: Any) -> Any:
    """The next item of a Serve response generator, as a coroutine."""
    return await generator.__anext__()


def cancel(response: Any) -> None:
    """Best-effort cancel of a Serve response or response generator (never raises)."""
    try:
        response.cancel()
    except Exception as exc:
        log.debug("cancel failed: %s", exc)
