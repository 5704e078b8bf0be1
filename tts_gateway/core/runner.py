"""Admission control and the bridge from worker threads to the event loop.

Synthesis never runs on the event loop. ``Admission`` bounds running work (MAX_CONCURRENCY) and
waiting work (MAX_QUEUE); a slot is released only when the worker thread has really stopped, so
a timed-out or abandoned synthesis cannot let more work in than there are slots. Slots go first
come, first served, and a streamed request passes its slot on between sentences when others
wait, so under load every stream gets its sentences in turn (round-robin) instead of waiting
behind whole requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from tts_gateway.core.metrics import Metrics
from tts_gateway.core.timings import Timings
from tts_gateway.errors import TimedOut, Unavailable

if TYPE_CHECKING:
    from tts_gateway.core.service import Plan, SynthesisService

log = logging.getLogger(__name__)
T = TypeVar("T")
DONE = object()  # the end of a `ThreadStream`
# How long a stream's worker waits for the event loop to take its first item (see `ThreadStream`).
HANDOFF_S = 0.005


class _Waiter:
    """A place in the admission queue; ``grant`` hands it a slot (called under the admission lock)."""

    __slots__ = ("grant",)

    def __init__(self, grant: Callable[[], object]) -> None:
        self.grant = grant


class Turn:
    """One request's admission slot. ``release`` is idempotent and may be called from any thread."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.held = True

    def release(self) -> None:
        self._admission._release(self)

    def crowded(self) -> bool:
        """Whether other requests hold or wait for a slot right now (a hint: read without the lock).
        The engines' core budget sees only calls inside an engine; a request that knows others are
        about to start takes one core, so that they run side by side instead of after it."""
        return self._admission.waiting > 0 or self._admission.running > 1

    def pass_on(self, cancel: threading.Event) -> None:
        """Between two sentences of a stream (worker thread): when others wait, give them this slot
        and queue again at the back, so every stream hears its next sentence in turn."""
        self._admission._pass_on(self, cancel)

    @contextmanager
    def lent(self, cancel: threading.Event) -> Iterator[None]:
        """While the request waits on work another thread does for many requests at once (a batching
        engine's shared step), its slot serves another request; afterwards it takes a slot again, queueing
        at the back when none is free (not when the block ends in an exception: the call is over). What
        bounds those requests meanwhile is the engine's batch size; the threads they use, the core budget."""
        lent = self._admission._lend(self)
        try:
            yield
        except BaseException:  # the call is ending (an error, a close): it needs no slot back
            if lent:
                self._admission._forgo()
            raise
        if lent:
            self._admission._reclaim(self, cancel)


class Admission:
    """A FIFO of slots shared by the event loop (requests wait for one) and worker threads (a
    stream passes its slot on between sentences). Thread-safe: one lock guards the counts."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.metrics = metrics
        self.running = 0  # slots held
        self.waiting = 0  # requests queued for a slot, new or passed on
        self.lent = 0  # requests that lent their slot while a batching engine works for them
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()

    def _publish(self) -> None:
        self.metrics.in_flight.set(self.running + self.lent)
        self.metrics.queue_depth.set(self.waiting)

    async def acquire(self) -> Turn:
        """Wait for a slot; 503 at once when the queue is full."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.running < self.max_concurrency and not self._waiters:
                self.running += 1
                self._publish()
                return Turn(self)
            if self.waiting >= self.max_queue:
                running = self.running + self.lent
                raise Unavailable(
                    f"server busy: {running} syntheses running and {self.waiting} waiting; retry shortly",
                    retry_after=2,
                )
            granted: asyncio.Future[None] = loop.create_future()
            waiter = _Waiter(lambda: loop.call_soon_threadsafe(_resolve, granted))
            self._waiters.append(waiter)
            self.waiting += 1
            self._publish()
        try:
            await granted
        except asyncio.CancelledError:  # the client went away while queued
            if not self._withdraw(waiter):
                Turn(self).release()  # the slot was granted meanwhile: hand it on
            raise
        return Turn(self)

    def _withdraw(self, waiter: _Waiter) -> bool:
        """Take ``waiter`` out of the queue; False when it was granted a slot already."""
        with self._lock:
            if waiter not in self._waiters:
                return False
            self._waiters.remove(waiter)
            self.waiting -= 1
            self._publish()
            return True

    def _hand_over(self) -> bool:
        """Give a slot to the head of the queue (under the lock); False when nobody waits."""
        if not self._waiters:
            return False
        self._waiters.popleft().grant()
        self.waiting -= 1
        return True

    def _release(self, turn: Turn) -> None:
        with self._lock:
            if not turn.held:
                return
            turn.held = False
            if not self._hand_over():
                self.running -= 1
            self._publish()

    def _pass_on(self, turn: Turn, cancel: threading.Event) -> None:
        with self._lock:
            if not turn.held or not self._waiters:
                return
            self._hand_over()
            turn.held = False
            waiter, back = self._enqueue()
        self._wait_back(turn, waiter, back, cancel)

    def _lend(self, turn: Turn) -> bool:
        with self._lock:
            if not turn.held:
                return False
            turn.held = False
            if not self._hand_over():
                self.running -= 1
            self.lent += 1
            self._publish()
            return True

    def _forgo(self) -> None:
        with self._lock:
            self.lent -= 1
            self._publish()

    def _reclaim(self, turn: Turn, cancel: threading.Event) -> None:
        with self._lock:
            self.lent -= 1
            if self.running < self.max_concurrency and not self._waiters:
                self.running += 1
                turn.held = True
                self._publish()
                return
            waiter, back = self._enqueue()
        self._wait_back(turn, waiter, back, cancel)

    def _enqueue(self) -> tuple[_Waiter, threading.Event]:
        """A worker thread's place at the back of the queue, and the event set when its slot comes (under the lock)."""
        back = threading.Event()
        waiter = _Waiter(back.set)
        self._waiters.append(waiter)
        self.waiting += 1
        self._publish()
        return waiter, back

    def _wait_back(self, turn: Turn, waiter: _Waiter, back: threading.Event, cancel: threading.Event) -> None:
        """Block until ``waiter`` is granted a slot for ``turn``, or leave the queue when ``cancel`` is set."""
        while not back.wait(0.05):
            if cancel.is_set():
                if self._withdraw(waiter):
                    return  # no slot held; the request stops at its next check of ``cancel``
                break  # granted just now
        turn.held = True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ThreadStream:
    """The one thread → event-loop bridge: runs a blocking generator in a thread, hands its items over.

    ``next()`` returns the next item, `DONE` at the end, or raises what the generator raised. The
    producer checks ``cancel`` between items, so setting it stops the work at the next chunk.

    The first item is the one a listener waits for: the producer lets the event loop take it (up to
    `HANDOFF_S`) before going on. Otherwise the next sentence's phonemization holds the GIL while
    the loop wants it, and its session takes every core while the client is woken (~3 ms later
    first audio at the client here).
    """

    def __init__(self, make: Callable[[], Iterator[Any]], cancel: threading.Event,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.cancel = cancel
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._taken = threading.Event()
        loop, queue, taken = self.loop, self._queue, self._taken

        def produce() -> None:
            try:
                handed = False
                for item in make():
                    if cancel.is_set():
                        break
                    if item:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                        if not handed:
                            handed = True
                            taken.wait(HANDOFF_S)
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
        self._taken.set()
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

    async def call_timed(self, plan: Plan) -> tuple[bytes, Timings]:
        """The whole encoded result and its timings."""
        ...

    async def open_timed_stream(self, plan: Plan, on_complete: Callable[[], None] | None = None,
                                ) -> tuple[Any, AsyncIterator[Any]]:
        """Like ``open_stream``, with `TimedBytes` items (the first may be an empty one at the end)."""
        ...


@runtime_checkable
class HealthReportingRunner(Protocol):
    """A runner whose engines run elsewhere and may be missing there (Ray: each engine needs a live replica)."""

    def health(self) -> str | None:
        """None when every engine can be reached; else which ones cannot, and why."""
        ...


class LocalRunner:
    """Runs plans in this process: admission control, then a worker thread."""

    def __init__(self, service: SynthesisService, admission: Admission, worker: Worker) -> None:
        self.service = service
        self.admission = admission
        self.worker = worker

    async def call(self, plan: Plan) -> bytes:
        return await self._whole(lambda cancel, turn: self.service.synthesize_bytes(plan, cancel, turn))

    async def call_timed(self, plan: Plan) -> tuple[bytes, Timings]:
        def whole(cancel: threading.Event, turn: Turn) -> tuple[bytes, Timings]:
            items = list(self.service.run_timed(plan, cancel, turn=turn))
            return b"".join(item.audio for item in items), Timings.of(items)

        return await self._whole(whole)

    async def open_stream(self, plan: Plan, on_complete: Callable[[], None] | None = None,
                          ) -> tuple[bytes, AsyncIterator[bytes]]:
        return await self._stream(lambda cancel, turn: self.service.run(plan, cancel, turn=turn), on_complete)

    async def open_timed_stream(self, plan: Plan, on_complete: Callable[[], None] | None = None,
                                ) -> tuple[Any, AsyncIterator[Any]]:
        return await self._stream(lambda cancel, turn: self.service.run_timed(plan, cancel, turn=turn), on_complete)

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        turn = await self.admission.acquire()
        return await self.worker.call(fn, threading.Event(), turn.release)

    async def _whole(self, work: Callable[[threading.Event, Turn], T]) -> T:
        """``work(cancel, turn)`` in a worker thread once admitted; the slot is freed when the thread is done."""
        turn = await self.admission.acquire()
        cancel = threading.Event()
        return await self.worker.call(lambda: work(cancel, turn), cancel, turn.release)

    async def _stream(self, make: Callable[[threading.Event, Turn], Iterator[Any]],
                      on_complete: Callable[[], None] | None) -> tuple[Any, AsyncIterator[Any]]:
        """The generator ``make(cancel, turn)`` in a worker thread once admitted. A stream passes its slot on
        between sentences when others wait (``turn``): first audio for everyone."""
        turn = await self.admission.acquire()
        cancel = threading.Event()
        return await self.worker.stream(lambda: make(cancel, turn), cancel, turn.release, on_complete=on_complete)
