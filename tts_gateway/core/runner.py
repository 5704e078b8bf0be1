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
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tts_gateway.core.metrics import Metrics
from tts_gateway.errors import TimedOut, Unavailable

if TYPE_CHECKING:
    from tts_gateway.core.service import Plan, SynthesisService

log = logging.getLogger(__name__)
T = TypeVar("T")
DONE = object()  # the end of a `ThreadStream`


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


class ThreadStream:
    """The one thread → event-loop bridge: runs a blocking generator in a thread, hands its items over.

    ``next()`` returns the next item, `DONE` at the end, or raises what the generator raised. The
    producer checks ``cancel`` between items, so setting it stops the work at the next chunk.
    """

    def __init__(self, make: Callable[[], Iterator[Any]], cancel: threading.Event,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancel = cancel
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        loop, queue = self.loop, self._queue

        def produce() -> None:
            try:
                for item in make():
                    if cancel.is_set():
                        break
                    if item:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                loop.call_soon_threadsafe(queue.put_nowait, DONE)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, _Raised(exc))

        if executor is not None:
            self.finished: asyncio.Future[Any] = self.loop.run_in_executor(executor, produce)
        else:  # its own thread: a cancelled request must never wait behind others in a pool
            self.finished = self.loop.create_future()

            def run() -> None:
                try:
                    produce()
                finally:
                    loop.call_soon_threadsafe(self._finish)

            threading.Thread(target=run, name="tts-stream", daemon=True).start()

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    async def next(self, timeout: float | None = None) -> Any:
        """The next item or `DONE`; `TimeoutError` after ``timeout`` seconds."""
        item = await (asyncio.wait_for(self._queue.get(), timeout) if timeout is not None else self._queue.get())
        if isinstance(item, _Raised):
            raise item.exc
        return item


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Cancelling:
    """An async iterator whose ``aclose()`` sets ``cancel`` even if iteration never started."""

    def __init__(self, inner: AsyncIterator[bytes], cancel: threading.Event) -> None:
        self._inner = inner
        self._cancel = cancel

    def __aiter__(self) -> _Cancelling:
        return self

    async def __anext__(self) -> bytes:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        self._cancel.set()
        closer = getattr(self._inner, "aclose", None)
        if closer is not None:
            await closer()


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
        stream = ThreadStream(make, cancel, self.pool)
        stream.finished.add_done_callback(lambda _: release())
        loop = stream.loop
        deadline = loop.time() + self.timeout_s

        async def next_item() -> Any:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return await stream.next(remaining)

        try:
            first = await next_item()
        except TimeoutError:
            cancel.set()
            raise TimedOut(f"no audio within {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except BaseException:
            cancel.set()
            raise
        finished = first is DONE
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
                    except Exception as exc:
                        log.error("stream ended early: %s", exc)
                        return
                    if item is DONE:
                        if on_complete is not None:
                            on_complete()
                        return
                    yield item
            finally:
                cancel.set()  # normal end, error or client disconnect: stop the worker

        return first, _Cancelling(rest(), cancel)


class Runner(Protocol):
    """Where a planned synthesis runs: in this process (`LocalRunner`) or on Ray Serve replicas."""

    async def call(self, plan: Plan) -> bytes:
        """The whole encoded result."""
        ...

    async def open_stream(self, plan: Plan, on_complete: Callable[[], None] | None = None,
                          ) -> tuple[bytes, AsyncIterator[bytes]]:
        """The first chunk (awaited, so early errors keep their kind) and an iterator over the rest."""
        ...

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """A blocking call (registration, conditioning) under the same admission control."""
        ...


class LocalRunner:
    """Runs plans in this process: admission control, then a worker thread."""

    def __init__(self, service: SynthesisService, admission: Admission, worker: Worker) -> None:
        self.service = service
        self.admission = admission
        self.worker = worker

    async def call(self, plan: Plan) -> bytes:
        release = await self.admission.acquire()
        cancel = threading.Event()
        return await self.worker.call(lambda: self.service.synthesize_bytes(plan, cancel), cancel, release)

    async def open_stream(self, plan: Plan, on_complete: Callable[[], None] | None = None,
                          ) -> tuple[bytes, AsyncIterator[bytes]]:
        release = await self.admission.acquire()
        cancel = threading.Event()
        return await self.worker.stream(lambda: self.service.run(plan, cancel), cancel, release,
                                        on_complete=on_complete)

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        release = await self.admission.acquire()
        return await self.worker.call(fn, threading.Event(), release)
