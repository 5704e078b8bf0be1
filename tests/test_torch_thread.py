"""The torch thread: every XTTS torch call runs on one thread, in a known order, and nothing is lost."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.conftest import HANG_GUARD_S, wait_until
from tts_gateway.engines.torch_thread import TorchThread


class Rounds:
    """A stepper that runs ``rounds`` rounds, recording them, each waiting at ``gate`` if one is given."""

    def __init__(self, rounds: int, log: list[str], gate: threading.Event | None = None) -> None:
        self.left = rounds
        self.log = log
        self.gate = gate
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def busy(self) -> bool:
        with self.lock:
            return self.left > 0

    def tick(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(HANG_GUARD_S)
        with self.lock:
            self.left -= 1
        self.log.append("round")


def test_calls_run_on_the_thread_and_give_back_their_value_or_their_error() -> None:
    runner = TorchThread(name="torch-test")
    assert runner.call(lambda: threading.current_thread().name) == "torch-test"

    def fails() -> None:
        raise ValueError("its own error")

    with pytest.raises(ValueError, match="its own error"):
        runner.call(fails)
    assert runner.call(lambda: 41 + 1) == 42  # the thread survived the error
    # A call made from the thread itself runs at once (no deadlock waiting for itself).
    assert runner.call(lambda: runner.call(lambda: "inner")) == "inner"


def test_urgent_calls_go_first_and_queued_calls_run_between_the_steppers_rounds() -> None:
    runner = TorchThread(name="torch-order")
    log: list[str] = []
    gate = threading.Event()
    stepper = Rounds(3, log, gate)
    runner.attach(stepper)  # its first round starts and waits at the gate
    wait_until(lambda: stepper.threads == {"torch-order"}, "the first round to start")
    callers = []
    for name, urgent in (("decode-a", False), ("first-audio", True), ("decode-b", False)):
        callers.append(threading.Thread(target=runner.call, args=(lambda n=name: log.append(n),),
                                        kwargs={"urgent": urgent}))
        callers[-1].start()
        wait_until(lambda n=len(callers): len(runner._calls) + len(runner._urgent) == n, f"{name} to queue")
    gate.set()
    for caller in callers:
        caller.join(HANG_GUARD_S)
    wait_until(lambda: not stepper.busy(), "the rounds to finish")
    # The round that was running finishes; then the urgent call, then the calls queued meanwhile in their
    # order, all before the next round.
    assert log == ["round", "first-audio", "decode-a", "decode-b", "round", "round"]
    runner.detach(stepper)


def test_a_stream_of_calls_does_not_starve_the_rounds() -> None:
    """Calls that come while queued calls run wait for the next round (a stepper keeps its turn)."""
    runner = TorchThread(name="torch-fair")
    log: list[str] = []
    stepper = Rounds(2, log)
    started = threading.Event()
    release = threading.Event()

    def first() -> None:
        started.set()
        assert release.wait(HANG_GUARD_S)
        log.append("call-1")

    caller = threading.Thread(target=runner.call, args=(first,))
    caller.start()
    assert started.wait(HANG_GUARD_S)  # the thread is in call-1
    runner.attach(stepper)
    later = threading.Thread(target=runner.call, args=(lambda: log.append("call-2"),))
    later.start()
    wait_until(lambda: len(runner._calls) == 1, "call-2 to queue")
    release.set()
    for thread in (caller, later):
        thread.join(HANG_GUARD_S)
    wait_until(lambda: not stepper.busy(), "the rounds to finish")
    assert log[:3] == ["call-1", "round", "call-2"]
    runner.detach(stepper)


def test_a_failing_round_does_not_stop_the_thread() -> None:
    runner = TorchThread(name="torch-robust")

    class Broken:
        def __init__(self) -> None:
            self.tries = 0

        def busy(self) -> bool:
            return self.tries < 2

        def tick(self) -> Any:
            self.tries += 1
            raise RuntimeError("a bug in a round")

    broken = Broken()
    runner.attach(broken)
    wait_until(lambda: broken.tries == 2, "both rounds to be tried")
    assert runner.call(lambda: "still serving") == "still serving"


@pytest.mark.xtts
def test_an_idle_thread_takes_the_calls_queued_on_a_thread_that_spills_to_it() -> None:
    """The narrow thread's queued calls run on the torch thread when that one has nothing of its own (the
    GPT's sentences are done): two at a time instead of one by one. While its stepper has rounds, it takes
    none of them; urgent calls and calls already running stay where they are."""
    from concurrent.futures import ThreadPoolExecutor

    main, side = TorchThread(name="main-test"), TorchThread(name="side-test")
    side.spill(main)
    log: list[str] = []
    gate = threading.Event()
    rounds = Rounds(3, log, gate)
    main.attach(rounds)
    running, release = threading.Event(), threading.Event()

    def first() -> str:  # holds the side thread, so the next calls wait in its queue
        running.set()
        assert release.wait(HANG_GUARD_S)
        return threading.current_thread().name

    def name() -> str:
        return threading.current_thread().name

    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(side.call, first)
        assert running.wait(HANG_GUARD_S)
        queued = [pool.submit(side.call, name) for _ in range(2)]
        wait_until(lambda: len(side._calls) == 2, "two calls queued on the side thread")
        gate.set()  # the main thread's rounds run; meanwhile it takes nothing
        wait_until(lambda: not rounds.busy(), "the rounds to end")
        # idle now: it takes the queued calls, one after the other, while the side thread is still held
        assert [f.result(timeout=HANG_GUARD_S) for f in queued] == ["main-test", "main-test"]
        assert log == ["round"] * 3
        release.set()
        assert held.result(timeout=HANG_GUARD_S) == "side-test"
    assert side.call(name) == "side-test"  # an idle side thread still runs its own calls


def test_every_torch_call_of_the_xtts_engine_runs_on_the_torch_thread(tiny_xtts: Any) -> None:
    """Whole, streamed and seeded sentences and a voice's conditioning, asked from several threads at once:
    every module of the model runs on the torch thread (one OpenMP pool, see `torch_thread`), but decoder
    calls that may run beside the GPT's steps on the narrow thread, on one intra-op thread (no pool)."""
    import numpy as np

    from tests.test_xtts_batching import together
    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.torch_thread import narrow_thread, torch_thread
    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = XttsEngine(tiny_xtts, max_batch=4)
    loader = threading.Thread(target=engine.load, name="loader")
    loader.start()
    loader.join(HANG_GUARD_S)
    import torch

    ran: set[str] = set()
    beside: set[tuple[str, int]] = set()  # (module, intra-op threads) run on the narrow thread
    decoder = {id(m) for m in engine._model.hifigan_decoder.modules()}

    def record(module: Any, *_: Any) -> None:
        ran.add(threading.current_thread().name)
        if threading.current_thread().name == narrow_thread()._thread.name:
            beside.add(("decoder" if id(module) in decoder else type(module).__name__, torch.get_num_threads()))

    hooks = [module.register_forward_pre_hook(record) for module in engine._model.modules()]
    speaker = engine.voices()[0].id
    try:
        def say(**options: Any) -> int:
            chunks = engine.synthesize("A sentence from one of several threads.", VoiceInput(builtin=speaker),
                                       SynthesisOptions(language="en", **options))
            return int(sum(chunk.size for chunk in chunks))

        rng = np.random.default_rng(0)
        reference = (0.1 * rng.standard_normal(engine.reference_sample_rate * 3)).astype(np.float32)
        outs = together([lambda: say(seed=1, repeatable=False), lambda: say(seed=2, streaming=True),
                         lambda: say(seed=3, repeatable=True), lambda: engine.compute_latents(reference)])
    finally:
        for hook in hooks:
            hook.remove()
        engine.unload()
    assert all(n > 2400 for n in outs[:3]) and set(outs[3]) == {"gpt_cond_latent", "speaker_embedding"}
    assert torch_thread()._thread.name in ran <= {torch_thread()._thread.name, narrow_thread()._thread.name}
    assert beside <= {("decoder", 1)}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end, on purpose
def test_a_call_to_a_thread_that_has_stopped_fails_instead_of_waiting_forever(monkeypatch: Any) -> None:
    from tts_gateway.engines import torch_thread as module

    monkeypatch.setattr(module, "_ALIVE_CHECK_S", 0.05)
    runner = TorchThread(name="torch-dies")

    class Fatal:
        def busy(self) -> bool:
            return True

        def tick(self) -> None:
            raise SystemExit("not an Exception: it ends the thread")

    runner.attach(Fatal())
    runner._thread.join(HANG_GUARD_S)
    assert not runner._thread.is_alive()
    with pytest.raises(RuntimeError, match="torch thread has stopped"):
        runner.call(lambda: "never runs")
