"""Sharing the machine's cores among concurrent engine calls.

On a small CPU, one inference session with as many intra-op threads as there are cores is the
fastest way to run a lone request, while several requests at once go fastest on single-threaded
sessions side by side; sessions that each use every core oversubscribe the machine and lose. A
`CoreBudget` hands out "wide" (all cores) or "narrow" (one core) slots so that the threads of the
running calls never exceed the cores: a call alone gets a wide slot, calls that overlap get narrow
ones, in the order they asked (first come, first served, so no stream starves). A call that had to
wait is evidence of load: it runs narrow even when its turn finds the machine idle, so that under a
steady stream of requests the calls run side by side instead of one wide call after another.

Engines that cannot change their thread count per call (torch: XTTS) or use one core (espeak-ng)
ask for an exact number of threads instead, in the same queue. One budget serves the whole process
(`shared_budget`), so Piper, XTTS and espeak-ng calls together never use more threads than cores.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar


class CoreBudget:
    """A budget of ``cores`` threads shared by engine calls (see the module docstring).

    Args:
        cores: Threads the calls may use together; the machine's core count by default.
    """

    def __init__(self, cores: int | None = None) -> None:
        self.cores = max(1, cores or os.cpu_count() or 1)
        self._used = 0
        self._wide = False
        self._queue: deque[int] = deque()
        self._urgent: set[int] = set()  # tickets queued ahead of the others (in their own arrival order)
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._used

    def _grant(self, ticket: int, wide: bool, exactly: int | None = None) -> int | None:
        """Threads for the head of the queue, or None when it must wait (called under the lock)."""
        if self._queue[0] != ticket:
            return None
        if exactly is not None:
            return exactly if self._used + exactly <= self.cores and not self._wide else None
        if wide and self._used == 0 and len(self._queue) == 1:
            return self.cores  # alone: the whole machine
        if not self._wide and self._used < self.cores:
            return 1
        return None

    @contextmanager
    def slot(self, wide: bool = True, threads: int | None = None, urgent: bool = False) -> Iterator[int]:
        """Wait for a slot; yields how many intra-op threads the call may use (``cores`` or 1).

        ``wide=False`` always asks for one thread: for output that must not depend on the load
        (floating-point sums split across a different number of threads may round differently).
        ``threads=N`` asks for exactly N (at most ``cores``), for a call whose thread count is fixed.
        ``urgent``: queued ahead of every call that is not (a short call a listener is waiting on: a
        stream's first audio), behind the urgent ones that came first.
        """
        exactly = None if threads is None else min(max(1, threads), self.cores)
        with self._cond:
            ticket = next(self._tickets)
            if urgent:
                ahead = sum(1 for t in self._queue if t in self._urgent)  # the urgent ones lead the queue
                self._queue.insert(ahead, ticket)
                self._urgent.add(ticket)
            else:
                self._queue.append(ticket)
            try:
                while (granted := self._grant(ticket, wide, exactly)) is None:
                    wide = False  # it waited: there is load, the next call will overlap this one
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._urgent.discard(ticket)
                self._cond.notify_all()
            self._used += granted
            self._wide = granted == self.cores and self.cores > 1
        try:
            yield granted
        finally:
            with self._cond:
                self._used -= granted
                if self._wide and granted == self.cores:
                    self._wide = False
                self._cond.notify_all()


T = TypeVar("T")


def process_once(factory: Callable[[], T]) -> Callable[[], T]:
    """A function giving the one ``factory()`` of the process: made at the first call, under a lock (two
    callers at once never make two, as ``functools.cache`` may)."""
    made: list[T] = []
    lock = threading.Lock()

    @functools.wraps(factory)
    def get() -> T:
        with lock:
            if not made:
                made.append(factory())
            return made[0]

    return get


@process_once
def shared_budget() -> CoreBudget:
    """The process's one budget, shared by every engine that runs here."""
    return CoreBudget()
