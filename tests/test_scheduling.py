"""The core budget and in-order parallel sentences: properties that hold by construction, not timing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import HANG_GUARD_S, decode, running_app, wait_until
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.engines.base import Capabilities, SynthesisOptions, VoiceInput
from tts_gateway.engines.scheduling import CoreBudget, shared_budget


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


class _Recording(FakeEngine):
    """Records each sentence it is asked for, in order, with whether it was to run side by side."""

    def __init__(self, parallel: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []
        if parallel:
            self.capabilities = Capabilities(streaming=True, deterministic=True, parallel_pieces=True)

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.calls.append((text, options.side_by_side))
        return super().synthesize(text, voice, options)


def _two_requests_on_one_slot(make_settings: Any, first_streams: bool) -> list[str]:
    """A 3-sentence request holds the only slot at its first sentence while a 2-sentence stream queues;
    the order in which the engine is then asked for sentences."""
    from tests.conftest import app_state

    engine = _Recording()
    settings = make_settings(engines=(), default_voice="fake:one", max_concurrency=1, max_queue=4, canary=False,
                             cache_bytes=0)
    results: list[int] = []
    with running_app(settings, FakePlugin(engine)) as client:
        gateway = app_state(client)
        engine.gate = threading.Event()
        first = threading.Thread(target=lambda: results.append(client.post("/v1/synthesize", json={
            "text": "Alpha one. Alpha two. Alpha three.", "stream": first_streams}).status_code))
        first.start()
        assert engine.started.wait(HANG_GUARD_S)
        second = threading.Thread(target=lambda: results.append(client.post("/v1/synthesize", json={
            "text": "Bravo one. Bravo two.", "stream": True}).status_code))
        second.start()
        wait_until(lambda: gateway.admission.waiting == 1, "the stream to queue for the slot")
        engine.gate.set()
        first.join(HANG_GUARD_S)
        second.join(HANG_GUARD_S)
        # The slot comes back when the worker thread has stopped, which may be just after the response.
        wait_until(lambda: gateway.admission.running == 0 and gateway.admission.waiting == 0, "the slot to return")
    assert results == [200, 200]
    assert engine.max_active == 1  # one slot: never two sentences at once
    return [text for text, _ in engine.calls]


def test_streams_take_turns_sentence_by_sentence_under_load(make_settings: Any) -> None:
    """Round-robin per sentence: the queued stream's first sentence comes before the running one's second."""
    assert _two_requests_on_one_slot(make_settings, first_streams=True) == [
        "Alpha one.", "Bravo one.", "Alpha two.", "Bravo two.", "Alpha three."]


def test_a_whole_response_keeps_its_slot_to_the_end(make_settings: Any) -> None:
    """Taking turns would delay every whole response for nobody's benefit: only streams give way."""
    assert _two_requests_on_one_slot(make_settings, first_streams=False) == [
        "Alpha one.", "Alpha two.", "Alpha three.", "Bravo one.", "Bravo two."]


def test_sentences_side_by_side_only_in_whole_responses(make_settings: Any) -> None:
    """A whole multi-sentence response runs its sentences side by side (one core each, but the last,
    which may find the cores free); a stream runs them one after the other, each with every core; a
    single sentence always has every core."""
    engine = _Recording(parallel=True)
    settings = make_settings(engines=(), default_voice="fake:one", canary=False, cache_bytes=0)
    text = "Alpha one. Alpha two. Alpha three."
    with running_app(settings, FakePlugin(engine)) as client:
        for body, expected in (({"text": text}, {"Alpha one.": True, "Alpha two.": True, "Alpha three.": False}),
                               ({"text": text, "stream": True},
                                {"Alpha one.": False, "Alpha two.": False, "Alpha three.": False}),
                               ({"text": "Alpha one."}, {"Alpha one.": False})):
            engine.calls.clear()
            response = client.post("/v1/synthesize", json=body)
            assert response.status_code == 200, response.text
            assert dict(engine.calls) == expected, (body, engine.calls)


def test_a_call_of_fixed_threads_waits_for_them_in_turn() -> None:
    """``threads=N`` (torch's fixed pool, espeak-ng's one core) waits until N are free, first come first served."""
    budget = CoreBudget(cores=2)
    order: list[str] = []

    def call(name: str, **ask: Any) -> None:
        with budget.slot(**ask) as threads:
            order.append(f"{name}:{threads}")

    with budget.slot(wide=False):  # one core busy: a 2-thread call cannot start
        fixed = threading.Thread(target=call, args=("fixed",), kwargs={"threads": 2})
        fixed.start()
        wait_until(lambda: len(budget._queue) == 1, "the 2-thread call to queue")
        later = threading.Thread(target=call, args=("later",), kwargs={"wide": False})
        later.start()  # a free core, but it came after the 2-thread call: it waits its turn
        wait_until(lambda: len(budget._queue) == 2, "the later call to queue behind it")
        assert order == []
    fixed.join(HANG_GUARD_S)
    later.join(HANG_GUARD_S)
    assert order == ["fixed:2", "later:1"] and budget.in_use == 0


def test_urgent_calls_go_ahead_of_the_queue_in_their_own_order() -> None:
    """A stream's first audio (urgent) is served before calls queued earlier, after urgent ones before it."""
    budget = CoreBudget(cores=2)
    order: list[str] = []

    def call(name: str, **ask: Any) -> None:
        with budget.slot(threads=2, **ask):
            order.append(name)

    callers = []
    with budget.slot(threads=2):  # the cores are taken: everyone queues
        for name, urgent in (("step", False), ("first-a", True), ("step-2", False), ("first-b", True)):
            callers.append(threading.Thread(target=call, args=(name,), kwargs={"urgent": urgent}))
            callers[-1].start()
            wait_until(lambda n=len(callers): len(budget._queue) == n, f"{name} to queue")
        assert order == []
    for caller in callers:
        caller.join(HANG_GUARD_S)
    assert order == ["first-a", "first-b", "step", "step-2"] and budget.in_use == 0 and not budget._urgent


def test_a_streams_first_decode_is_urgent_and_the_rest_are_not(tiny_xtts: Path) -> None:
    """The real XTTS streaming path asks the budget for its first audio's decode ahead of the queue."""
    from contextlib import contextmanager

    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = XttsEngine(tiny_xtts, device="cpu")
    engine.load()
    asked: list[bool] = []
    real = engine._cores

    @contextmanager
    def recording(threads: int | None, urgent: bool = False) -> Iterator[int]:
        asked.append(urgent)
        with real(threads, urgent=urgent) as granted:
            yield granted

    assert engine._batcher is not None
    engine._batcher.cores = lambda repeatable: real(engine._threads if repeatable else None)  # steps: not recorded
    engine._cores = recording  # type: ignore[method-assign]
    try:
        speaker = engine.voices()[0].id
        chunks = list(engine.synthesize("A stream of several chunks of audio, to hear the first one early.",
                                        VoiceInput(builtin=speaker), SynthesisOptions(language="en", seed=4,
                                                                                      streaming=True)))
    finally:
        engine.unload()
    # One decode a chunk (the decoder's set-up is part of the first); only the first audio's is urgent (the
    # later decodes queue in turn, or run beside the GPT's steps on the narrow thread).
    assert len(chunks) >= 2 and len(asked) >= len(chunks)
    assert asked == [True] + [False] * (len(asked) - 1)


def _held_engine_call(run: Callable[[], Any], queued: int = 1) -> Any:
    """Run an engine call while the process's budget is taken by another call: it must queue (``queued``
    slots) for a core and finish once the cores are free."""
    budget = shared_budget()
    out: list[Any] = []
    with budget.slot():  # alone: the whole machine
        caller = threading.Thread(target=lambda: out.append(run()))
        caller.start()
        wait_until(lambda: len(budget._queue) == queued, "the engine call to queue for a core")
        assert out == []
    caller.join(HANG_GUARD_S)
    assert budget.in_use == 0
    return out[0]


def test_espeak_waits_for_a_core_in_the_shared_budget() -> None:
    from tts_gateway.engines.espeak_engine import EspeakEngine

    engine = EspeakEngine()
    engine.load()
    audio = _held_engine_call(lambda: np.concatenate(list(engine.synthesize(
        "Waiting for a core.", VoiceInput(builtin="en"), SynthesisOptions(language="en")))))
    assert audio.size > 0 and np.abs(audio).max() > 0


def test_xtts_waits_for_its_threads_in_the_shared_budget(tiny_xtts: Path) -> None:
    """The real XTTS code on the tiny checkpoint: its torch threads count against the same cores as Piper's."""
    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = XttsEngine(tiny_xtts, device="cpu")
    engine.load()
    speaker = engine.voices()[0].id
    # The GPT's prompt queues for its slot (the sentence's decoder asks for one only once tokens come).
    audio = _held_engine_call(lambda: np.concatenate(list(engine.synthesize(
        "Waiting for the cores.", VoiceInput(builtin=speaker), SynthesisOptions(language="en", seed=3)))))
    assert audio.size > 0


def test_a_request_takes_one_core_while_others_are_in_flight(make_settings: Any) -> None:
    """The engines' budget sees only calls inside an engine; admission knows a second request is in
    flight, so both run on one core each instead of the first taking every core (and a lone request
    still gets them all)."""
    from tests.conftest import app_state

    engine = _Recording()
    settings = make_settings(engines=(), default_voice="fake:one", max_concurrency=2, canary=False, cache_bytes=0)
    results: list[int] = []
    with running_app(settings, FakePlugin(engine)) as client:
        gateway = app_state(client)
        assert client.post("/v1/synthesize", json={"text": "Alone."}).status_code == 200
        engine.started.clear()
        engine.gate = threading.Event()
        first = threading.Thread(target=lambda: results.append(
            client.post("/v1/synthesize", json={"text": "First."}).status_code))
        first.start()
        assert engine.started.wait(HANG_GUARD_S)
        second = threading.Thread(target=lambda: results.append(
            client.post("/v1/synthesize", json={"text": "Second."}).status_code))
        second.start()
        wait_until(lambda: len(engine.calls) == 3, "the second request to reach the engine")
        engine.gate.set()
        first.join(HANG_GUARD_S)
        second.join(HANG_GUARD_S)
        wait_until(lambda: gateway.admission.running == 0, "the slots to return")
    assert results == [200, 200]
    assert engine.calls == [("Alone.", False), ("First.", False), ("Second.", True)]


def test_a_lent_admission_slot_serves_the_next_request_and_is_taken_back_in_turn() -> None:
    """A request waiting on a batching engine's shared step lends its slot: with one slot, a second request
    is admitted meanwhile; taking the slot back queues behind whoever holds it, and a cancel while queued
    leaves the queue without a slot."""
    import asyncio

    from tts_gateway.core.metrics import Metrics
    from tts_gateway.core.runner import Admission

    admission = Admission(max_concurrency=1, max_queue=4, metrics=Metrics())

    async def scenario() -> None:
        first = await admission.acquire()
        second_waits = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0)
        assert admission.waiting == 1 and not second_waits.done()
        lent = first.lent(threading.Event())
        await asyncio.to_thread(lent.__enter__)
        second = await asyncio.wait_for(second_waits, HANG_GUARD_S)  # admitted while the first is lent
        assert admission.running == 1 and admission.lent == 1
        back = asyncio.ensure_future(asyncio.to_thread(lent.__exit__, None, None, None))
        await asyncio.to_thread(wait_until, lambda: admission.waiting == 1, "the first to queue for its slot")
        assert not first.held and not back.done()
        second.release()
        await asyncio.wait_for(back, HANG_GUARD_S)
        assert first.held and admission.running == 1 and admission.lent == 0 and admission.waiting == 0

        cancel = threading.Event()
        lent = first.lent(cancel)
        await asyncio.to_thread(lent.__enter__)
        third = await admission.acquire()
        back = asyncio.ensure_future(asyncio.to_thread(lent.__exit__, None, None, None))
        await asyncio.to_thread(wait_until, lambda: admission.waiting == 1, "the first to queue again")
        cancel.set()
        await asyncio.wait_for(back, HANG_GUARD_S)
        assert not first.held and admission.waiting == 0 and admission.running == 1
        first.release()  # nothing held: a no-op
        third.release()
        assert admission.running == 0 and admission.lent == 0

        fourth = await admission.acquire()
        # The call ends in an error while lent: it takes no slot back.
        with pytest.raises(RuntimeError), fourth.lent(threading.Event()):
            raise RuntimeError("the engine failed")
        assert not fourth.held and (admission.running, admission.lent, admission.waiting) == (0, 0, 0)

    asyncio.run(scenario())
