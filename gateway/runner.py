"""Admission control and the bridge from worker threads to the event loop.

Synthesis never runs on the event loop. ``Admission`` bounds running work (MAX_CONCURRENCY) and
waiting work (MAX_QUEUE); a slot is released only when the worker thread has really stopped, so
a timed-out or abandoned synthesis cannot let more work in than there are slots.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tts_gateway.errors import TimedOut, Unavailable
from tts_gateway.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.metrics = metrics
        self.running = 0
        self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # bound to the running loop on first use
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._sem

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot; 503 at once when the queue is full. Returns an idempotent release."""
        sem = self._semaphore()
        if self.running >= self.max_concurrency and self.waiting >= self.max_queue:
            raise Unavailable(
                f"server busy: {self.running} syntheses running and {self.waiting} waiting; retry shortly",
                retry_after=2,
            )
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await sem.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.running += 1
        self.metrics.in_flight.set(self.running)
        released = False
        loop = asyncio.get_running_loop()

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.running -= 1
            self.metrics.in_flight.set(self.running)
            sem.release()

        def release_threadsafe() -> None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                release()
            else:
                loop.call_soon_threadsafe(release)

        return release_threadsafe


class Worker:
    """Runs blocking calls in a thread pool with a timeout and cancellation."""

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tts-worker")
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn: Callable[[], T], cancel: threading.Event,
                   release: Callable[[], None] | None = None) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, fn)
        if release is not None:
            future.add_done_callback(lambda _: release())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            cancel.set()
            raise TimedOut(f"synthesis took longer than {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            cancel.set()  # the client went away
            raise

    async def stream(self, make: Callable[[], Iterator[bytes]], cancel: threading.Event,
                     release: Callable[[], None], on_complete: Callable[[], None] | None = None,
                     ) -> tuple[bytes, AsyncIterator[bytes]]:
        """Start a generator in a thread; return its first chunk and an iterator over the rest.

        The first chunk is awaited before the response starts, so errors found before any audio
        exists still get their proper status code. ``on_complete`` runs only when the generator
        finished normally (not on error, timeout or disconnect).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        deadline = loop.time() + self.timeout_s

        def produce() -> None:
            try:
                for chunk in make():
                    if cancel.is_set():
                        break
                    if chunk:
                        loop.call_soon_threadsafe(queue.put_nowait, chunk)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        future = loop.run_in_executor(self.pool, produce)
        future.add_done_callback(lambda _: release())

        async def next_item() -> Any:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(queue.get(), remaining)

        try:
            first = await next_item()
        except TimeoutError:
            cancel.set()
            raise TimedOut(f"no audio within {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            cancel.set()
            raise
        if isinstance(first, BaseException):
            cancel.set()
            raise first
        finished = first is _DONE
        if finished:
            first = b""
            if on_complete is not None:
                on_complete()

        async def rest() -> AsyncIterator[bytes]:
            try:
                if finished:
                    return
                while True:
                    try:
                        item = await next_item()
                    except TimeoutError:
                        return  # headers are sent: end the stream early; the log says why
                    if item is _DONE:
                        if on_complete is not None:
                            on_complete()
                        return
                    if isinstance(item, BaseException):
                        log.error("stream ended early: %s", item)
                        return
                    yield item
            finally:
                cancel.set()  # normal end, error or client disconnect: stop the worker

        return first, rest()
