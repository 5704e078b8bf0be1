"""The core budget and in-order parallel sentences: properties that hold by construction, not timing."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from tests.conftest import HANG_GUARD_S, decode, running_app, wait_until
from tts_gateway.engines.scheduling import CoreBudget


def test_a_call_alone_gets_every_core_and_overlapping_calls_one_each() -> None:
    budget = CoreBudget(cores=2)
    with budget.slot() as alone:
        assert alone == 2 and budget.in_use == 2
    inside = threading.Barrier(3, timeout=HANG_GUARD_S)
    grants: list[int] = []

    def call() -> None:
        with budget.slot() as threads:
            grants.append(threads)
            inside.wait()  # both calls are inside at once: only possible with one thread each
            inside.wait()

    with budget.slot():  # hold the machine until both calls are queued behind this one
        callers = [threading.Thread(target=call) for _ in range(2)]
        for caller in callers:
            caller.start()
        wait_until(lambda: len(budget._queue) == 2, "both calls to queue")
    inside.wait()
    assert sorted(grants) == [1, 1] and budget.in_use == 2
    inside.wait()
    for caller in callers:
        caller.join(HANG_GUARD_S)
    assert budget.in_use == 0


def test_a_call_that_waited_runs_narrow_even_when_its_turn_finds_the_machine_idle() -> None:
    budget = CoreBudget(cores=2)
    grants: list[int] = []

    def call() -> None:
        with budget.slot() as threads:
            grants.append(threads)

    with budget.slot() as first:  # a wide call, then another asks meanwhile
        assert first == 2
        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: len(budget._queue) == 1, "the second call to queue")
    caller.join(HANG_GUARD_S)
    assert grants == [1]  # alone by then, but it waited: load, so one thread (the next call will overlap it)
    with budget.slot() as later:  # no wait: the machine again
        assert later == 2


def test_threads_in_use_never_exceed_the_cores_and_everyone_is_served_in_order() -> None:
    budget = CoreBudget(cores=2)
    peak = 0
    lock = threading.Lock()
    order: list[int] = []

    def call(index: int) -> None:
        nonlocal peak
        with budget.slot(), lock:
            peak = max(peak, budget.in_use)
            order.append(index)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert len(order) == 40 and peak <= 2


def test_parallel_sentences_come_out_in_order_and_byte_identical(make_settings: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded Piper paragraph is the same audio whether its sentences run one by one or side by side."""
    from tts_gateway.core import service

    text = " ".join(f"This is sentence number {n}, spoken in order." for n in range(1, 7))
    results = []
    with running_app(make_settings()) as client:
        for window in (1, 3):
            monkeypatch.setattr(service, "PIECE_WINDOW", window)
            response = client.post("/v1/synthesize", json={"text": text, "seed": 4, "cache": False})
            assert response.status_code == 200, response.text
            results.append(decode(response.content)[0])
    assert results[0].size > 0 and np.array_equal(results[0], results[1])
