"""One thread for all of the process's torch compute.

PyTorch's CPU kernels run in parallel through OpenMP (libgomp), which gives every thread that starts a
parallel region a pool of worker threads of its own, kept while that thread lives. Once more pooled threads
are alive than the machine has cores, libgomp's workers stop spinning between regions and go to sleep
(its "throttled" spin), so every region pays a wake-up. A server runs requests on many threads: with the
decoder in the request's thread and the GPT in the batcher's, a second pool was always alive, and on 2
cores a small attention call took 52 µs instead of 13, a real-size GPT step 50 ms instead of 40 (measured
here). So XTTS's torch work (loading, prompts, GPT steps, decoders, conditioning) runs on this one thread;
other threads hand it calls (`TorchThread.call`) and wait for the answer.

The GPT batcher's loop runs here too, as a `Stepper`: between two of its rounds (a join or a GPT step) the
thread runs the calls that came meanwhile, the urgent ones (a listener's first audio) first.

A second thread (`narrow_thread`) runs decoder calls beside the GPT's steps, always on one intra-op thread:
ATen, MKL and oneDNN run a one-thread call inline, so it never forms an OpenMP pool and the reason above
does not apply to it. One GPT step uses two cores only 1.2–1.7× better than one (measured on two hosts), so a
decode on one core beside a step on the other gets more out of the machine than the two in turn. When the
first thread has nothing to do (the GPT's sentences are done), it takes the second's queued calls too
(`TorchThread.spill`): the last chunks of several answers then decode two at a time instead of one by one.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from tts_gateway.engines.scheduling import process_once

log = logging.getLogger(__name__)

T = TypeVar("T")

_ALIVE_CHECK_S = 1.0  # how often a waiting caller checks that the thread still runs


class Stepper(Protocol):
    """Work the thread runs in rounds, between calls (the GPT batcher)."""

    def busy(self) -> bool:
        """Whether it has a round to run (thread-safe)."""

    def tick(self) -> None:
        """One round; handles its own errors."""


class _Call:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the caller, never lost in this thread
            self.error = exc
        finally:
            self.done.set()


class TorchThread:
    """A thread that runs calls and `Stepper` rounds, one at a time (see the module docstring)."""

    def __init__(self, name: str = "torch") -> None:
        self._cond = threading.Condition()
        self._urgent: collections.deque[_Call] = collections.deque()
        self._calls: collections.deque[_Call] = collections.deque()
        self._steppers: list[Stepper] = []
        self._spill_to: TorchThread | None = None  # an idle thread that may take the calls queued here
        self._spilled: list[TorchThread] = []  # the threads whose queued calls this one takes when idle
        self._running = False  # a call is running (set under the lock): queued calls wait for this thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def here(self) -> bool:
        """Whether the caller is this thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], T], *, urgent: bool = False) -> T:
        """``fn()`` run on this thread (at once when called from it); its value, or its exception re-raised.
        ``urgent``: ahead of every call that is not, and before the next round of any stepper."""
        if self.here:
            return fn()
        call = _Call(fn)
        with self._cond:
            (self._urgent if urgent else self._calls).append(call)
            self._cond.notify()
        if self._spill_to is not None:
            self._spill_to.wake()
        while not call.done.wait(_ALIVE_CHECK_S):
            if not self._thread.is_alive():  # never wait forever on a thread that is gone
                raise RuntimeError("the torch thread has stopped; restart the process")
        if call.error is not None:
            raise call.error
        return call.value

    def spill(self, to: TorchThread) -> None:
        """Let ``to`` run the calls queued here when it has nothing of its own to do. A call must then not
        depend on which of the two runs it (each call sets its own intra-op threads)."""
        self._spill_to = to
        with to._cond:
            to._spilled.append(self)
            to._cond.notify()

    def _spillable(self) -> bool:
        """Calls wait here while this thread runs another (another thread may take them)."""
        return bool(self._calls) and self._running

    def _take_spilled(self) -> _Call | None:
        """The oldest call waiting on a thread that spills here while that thread runs another, or None."""
        for source in self._spilled:
            with source._cond:
                if source._spillable():
                    return source._calls.popleft()
        return None

    def _own_work(self) -> bool:
        """A call queued here, or a stepper with a round to run (under the lock)."""
        return bool(self._urgent or self._calls) or any(s.busy() for s in self._steppers)

    def attach(self, stepper: Stepper) -> None:
        with self._cond:
            self._steppers.append(stepper)
            self._cond.notify()

    def detach(self, stepper: Stepper) -> None:
        with self._cond:
            if stepper in self._steppers:
                self._steppers.remove(stepper)

    def wake(self) -> None:
        """A stepper has new work."""
        with self._cond:
            self._cond.notify()

    def _next(self, normal: int) -> tuple[_Call | None, bool]:
        """The next call to run and whether it is a normal one: an urgent one first, else one of the
        ``normal`` calls that were queued when the round began (under the lock)."""
        if self._urgent:
            return self._urgent.popleft(), False
        if normal > 0 and self._calls:
            return self._calls.popleft(), True
        return None, False

    def _run(self) -> None:
        while True:
            with self._cond:
                idle = not self._own_work()
                while idle and not any(source._spillable() for source in self._spilled):  # a hint (see take)
                    self._cond.wait()
                    idle = not self._own_work()
                # The calls queued now run before the next rounds; those that come meanwhile wait for them
                # (so a stream of calls cannot starve the steppers), except urgent ones.
                normal = len(self._calls)
            if idle:
                spilled = self._take_spilled()
                if spilled is not None:
                    spilled.run()
                continue
            while True:
                with self._cond:
                    call, was_normal = self._next(normal)
                    self._running = call is not None
                    waiting = bool(self._calls)
                if call is None:
                    break
                if waiting and self._spill_to is not None:  # they may go to the other thread now
                    self._spill_to.wake()
                normal -= was_normal
                call.run()
            with self._cond:
                steppers = list(self._steppers)
            for stepper in steppers:
                try:
                    if stepper.busy():
                        stepper.tick()
                except Exception:  # a stepper's own bug must not stop every other call
                    log.exception("torch thread: a stepper's round failed")


@process_once
def torch_thread() -> TorchThread:
    """The process's one torch thread."""
    return TorchThread()


@process_once
def narrow_thread() -> TorchThread:
    """The process's second torch thread: calls on one intra-op thread beside the first's (see above); the
    first takes its queued calls when it is idle."""
    narrow = TorchThread(name="torch-narrow")
    narrow.spill(torch_thread())
    return narrow


__all__ = ["Stepper", "TorchThread", "narrow_thread", "torch_thread"]
