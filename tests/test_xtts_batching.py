"""XTTS decodes concurrent requests together (issue 31), on the tiny checkpoint with the real XTTS code."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import HANG_GUARD_S, decode, running_app, wait_for_warm_up, wait_until
from tts_gateway.engines.base import SynthesisCancelled, SynthesisOptions, VoiceInput
from tts_gateway.engines.xtts_batching import GptBatcher, Sequence
from tts_gateway.engines.xtts_engine import XttsEngine
from tts_gateway.engines.xtts_kernels import INT8_KERNELS, choose_kernel

pytestmark = pytest.mark.xtts

TEXTS = [("Hello there, how are you today?", "en"), ("Guten Morgen, wie geht es dir?", "de"),
         ("Una frase corta.", "es"), ("A somewhat longer sentence, for the second voice to say.", "en")]


@pytest.fixture(scope="module")
def engine(tiny_xtts: Path) -> Iterator[XttsEngine]:
    engine = XttsEngine(tiny_xtts, max_batch=4)
    engine.load()
    yield engine
    engine.unload()


def speakers(engine: XttsEngine) -> list[str]:
    return [voice.id for voice in engine.voices()]


def say(engine: XttsEngine, text: str, language: str, speaker: str, seed: int, *, streaming: bool = False,
        repeatable: bool = True, cancel: threading.Event | None = None) -> np.ndarray:
    options = SynthesisOptions(language=language, seed=seed, repeatable=repeatable, streaming=streaming,
                               cancel=cancel or threading.Event())
    return np.concatenate(list(engine.synthesize(text, VoiceInput(builtin=speaker), options)))


def batcher(engine: XttsEngine) -> GptBatcher:
    assert engine._batcher is not None
    return engine._batcher


def together(jobs: list[Any]) -> list[Any]:
    """Run the jobs at the same moment (each waits at a barrier first) and return their results."""
    barrier = threading.Barrier(len(jobs))

    def run(job: Any) -> Any:
        barrier.wait(timeout=HANG_GUARD_S)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result(timeout=4 * HANG_GUARD_S) for f in [pool.submit(run, job) for job in jobs]]


def test_seeded_requests_in_one_batch_give_what_they_give_alone(engine: XttsEngine) -> None:
    """Different texts, voices, languages and modes (whole and streamed), decoded side by side."""
    voices = speakers(engine)
    jobs = [(text, language, voices[i % len(voices)], 10 + i, i % 2 == 1) for i, (text, language) in
            enumerate(TEXTS)]
    alone = [say(engine, t, lang, v, seed, streaming=s) for t, lang, v, seed, s in jobs]
    shared = together([lambda j=j: say(engine, j[0], j[1], j[2], j[3], streaming=j[4]) for j in jobs])
    for a, b in zip(alone, shared, strict=True):
        assert a.size > 2400 and np.array_equal(a, b)
    assert len({a.tobytes() for a in alone}) == len(alone)


def test_a_voice_conditioning_is_computed_once_and_seeded_bytes_do_not_depend_on_it(tiny_xtts: Path) -> None:
    """The prompt's conditioning positions are run apart and kept per voice: the second sentence of a voice
    runs only its text, and a seeded request gives the same bytes whether its voice was cached or not."""
    fresh = XttsEngine(tiny_xtts, max_batch=4)
    fresh.load()
    try:
        prefixes = batcher(fresh).prefixes
        first, second = speakers(fresh)[:2]
        cold = say(fresh, TEXTS[0][0], "en", first, seed=5)
        assert (prefixes.misses, prefixes.hits) == (1, 0)
        warm = say(fresh, TEXTS[0][0], "en", first, seed=5)
        assert (prefixes.misses, prefixes.hits) == (1, 1) and np.array_equal(cold, warm)
        other = say(fresh, TEXTS[0][0], "en", second, seed=5)
        assert prefixes.misses == 2 and not np.array_equal(other[: cold.size], cold[: other.size])
        streamed = say(fresh, TEXTS[1][0], TEXTS[1][1], first, seed=6, streaming=True)
        assert prefixes.hits == 2 and streamed.size > 2400
    finally:
        fresh.unload()


def test_the_conditioning_cache_is_bounded(engine: XttsEngine) -> None:
    import torch

    from tts_gateway.engines.xtts_batching import PrefixCache

    stack = batcher(engine).stack
    cache = PrefixCache(stack, voices=3)
    with torch.inference_mode():
        conditionings = [torch.randn(1, 4, stack.width) for _ in range(4)]
        kept = [cache.get(c) for c in conditionings]
        assert len(kept[0]) == stack.layers and kept[0][0][0].shape == (stack.heads, 4, stack.head_dim)
        assert cache.get(conditionings[3]) is kept[3] and cache.hits == 1
        assert cache.get(conditionings[0]) is not kept[0]  # the oldest voice was dropped for the fourth
        assert cache.misses == 5 and len(cache._kept) == 3


def test_unseeded_requests_share_each_step(engine: XttsEngine) -> None:
    voices = speakers(engine)
    first = batcher(engine)
    first.widest = 0
    steps_before = first.steps
    outs = together([lambda i=i: say(engine, TEXTS[i][0], TEXTS[i][1], voices[i % len(voices)], i, repeatable=False)
                     for i in range(4)])
    assert all(o.size > 2400 and np.isfinite(o).all() for o in outs)
    assert first.widest >= 2  # at least two sequences decoded in one forward pass
    # 4 sequences of at most max_gen tokens each, alone, would take 4 × that many steps
    assert first.steps - steps_before < 4 * first.stack.max_tokens


def test_a_request_joins_a_running_batch_and_leaves_it_without_disturbing_it(engine: XttsEngine) -> None:
    """The second request starts while the first is mid-sentence; one of them stops early (its stop token),
    the other goes on: every token each gets is what it gets alone."""
    voices = speakers(engine)
    stack = batcher(engine).stack
    seq_alone = _tokens(engine, TEXTS[0][0], voices[0], seed=1)
    other_alone = _tokens(engine, TEXTS[3][0], voices[1], seed=2)
    stop = seq_alone[10]  # from now on, this token ends a sentence: the first leaves after 11 tokens
    assert stop not in other_alone[:20]
    original = stack.stop_audio_token
    stack.stop_audio_token = stop
    try:
        first = _sequence(engine, TEXTS[0][0], voices[0], seed=1)
        gate = threading.Event()
        got: list[Any] = []

        def consume() -> None:
            for latent in first.latents():
                got.append(latent)
                if len(got) == 3:
                    gate.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert gate.wait(HANG_GUARD_S)
        second = _sequence(engine, TEXTS[3][0], voices[1], seed=2)  # joins while the first is running
        rest = list(second.latents())
        reader.join(HANG_GUARD_S)
    finally:
        stack.stop_audio_token = original
    assert first.tokens == seq_alone[:11] and len(got) == 11
    assert second.tokens[:20] == other_alone[:20] and len(rest) == len(second.tokens)


def _sequence(engine: XttsEngine, text: str, speaker: str, seed: int, repeatable: bool = True) -> Sequence:
    sequence = _sequence_unsubmitted(engine, text, speaker, seed, repeatable)
    batcher(engine).submit(sequence)
    return sequence


def _tokens(engine: XttsEngine, text: str, speaker: str, seed: int) -> list[int]:
    sequence = _sequence(engine, text, speaker, seed)
    for _ in sequence.latents():
        pass
    return list(sequence.tokens)


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(engine: XttsEngine) -> None:
    voices = speakers(engine)
    expected = [say(engine, TEXTS[i][0], TEXTS[i][1], voices[0], 30 + i) for i in range(3)]
    cancel = threading.Event()

    def cancelled() -> Any:
        options = SynthesisOptions(language="en", seed=99, repeatable=False, streaming=True, cancel=cancel)
        chunks = engine.synthesize(TEXTS[3][0], VoiceInput(builtin=voices[1]), options)
        next(chunks)  # its first audio: it is in the batch
        cancel.set()
        with pytest.raises(SynthesisCancelled):
            list(chunks)
        return "cancelled"

    results = together([cancelled, *[lambda i=i: say(engine, TEXTS[i][0], TEXTS[i][1], voices[0], 30 + i)
                                     for i in range(3)]])
    assert results[0] == "cancelled"
    for want, got in zip(expected, results[1:], strict=True):
        assert np.array_equal(want, got)
    wait_until(lambda: batcher(engine).active == 0, "the batch to empty")


def test_a_failing_sequence_fails_alone(engine: XttsEngine) -> None:
    import torch

    voices = speakers(engine)
    good = [_sequence(engine, TEXTS[i][0], voices[0], seed=40 + i, repeatable=False) for i in range(2)]
    broken = Sequence(prompt=torch.zeros(1, 5, 3), seed=1, repeatable=False)  # not the model's width
    batcher(engine).submit(broken)
    with pytest.raises(RuntimeError):
        list(broken.latents())
    for sequence in good:
        assert len(list(sequence.latents())) == len(sequence.tokens) > 0


def test_the_batch_limit_queues_the_rest(tiny_xtts: Path) -> None:
    engine = XttsEngine(tiny_xtts, max_batch=2)
    engine.load()
    try:
        voices = speakers(engine)
        outs = together([lambda i=i: say(engine, TEXTS[i][0], TEXTS[i][1], voices[0], i, repeatable=False)
                         for i in range(4)])
        assert all(o.size > 2400 for o in outs)
        assert batcher(engine).widest <= 2
    finally:
        engine.unload()


def test_unload_fails_the_waiting_requests_instead_of_hanging(tiny_xtts: Path) -> None:
    engine = XttsEngine(tiny_xtts, max_batch=1)
    engine.load()
    voices = speakers(engine)
    sequences = [_sequence(engine, TEXTS[i][0], voices[0], seed=i, repeatable=False) for i in range(3)]
    engine.unload()
    outcomes = []
    for sequence in sequences:
        try:
            list(sequence.latents())
            outcomes.append("finished")
        except RuntimeError as exc:
            outcomes.append(str(exc))
    assert any("unloaded" in o for o in outcomes), outcomes


def test_concurrent_http_requests_are_decoded_together(make_settings: Any, tiny_xtts: Path) -> None:
    settings = make_settings(engines=("piper", "xtts"), xtts_checkpoint=tiny_xtts, max_concurrency=4)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        xtts = [v["name"] for v in client.get("/v1/voices").json()["voices"] if v["engine"] == "xtts"]
        voice = xtts[0]
        assert client.post("/v1/engines/xtts/load").status_code == 200
        engine = app_engine(client)
        engine._batcher.widest = 0  # type: ignore[union-attr]
        responses = _four_at_once(client, voice, streamed=0)
        for response in responses:
            assert response.status_code == 200, response.text
            audio, rate = decode(response.content)
            assert rate == 24000 and audio.size > 2400
        assert engine._batcher.widest >= 2  # type: ignore[union-attr]


def _four_at_once(client: Any, voice: str, streamed: int) -> list[httpx.Response]:
    """Four XTTS requests (TEXTS' first four, in their languages) sent together; those whose index has the
    parity ``streamed`` are streamed."""

    def post(i: int) -> httpx.Response:
        return client.post("/v1/synthesize", json={"text": TEXTS[i][0], "language": TEXTS[i][1], "voice": voice,
                                                   "format": "wav", "stream": i % 2 == streamed})

    return together([lambda i=i: post(i) for i in range(4)])


@pytest.fixture(scope="module")
def long_xtts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose sentences run to 300 tokens: one sentence lasts hundreds of GPT steps, far
    longer than it takes another request to reach the batcher, on any machine. (Its decoder is XTTS's real
    HiFi-GAN: 300 tokens are some 13 s of audio, seconds to decode.)"""
    import subprocess
    import sys

    directory = tmp_path_factory.mktemp("long-xtts")
    subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "tiny-xtts", str(directory), "--max-audio-tokens",
                    "300"], check=True, timeout=4 * HANG_GUARD_S)
    return directory


@pytest.mark.parametrize("max_batch", [8, 2])
def test_requests_in_the_batch_lend_their_admission_slot(make_settings: Any, long_xtts: Path,
                                                         max_batch: int) -> None:
    """With one admission slot, four XTTS requests still share GPT steps: a request with a seat in the batch
    lends its slot to the next. The seats bound them: past the batch size the rest wait, and all finish."""
    settings = make_settings(engines=("piper", "xtts"), xtts_checkpoint=long_xtts, max_concurrency=1,
                             xtts_max_batch=max_batch, timeout_s=HANG_GUARD_S * 4)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        voice = next(v["name"] for v in client.get("/v1/voices").json()["voices"] if v["engine"] == "xtts")
        assert client.post("/v1/engines/xtts/load").status_code == 200
        engine = app_engine(client)
        batcher(engine).widest = 0
        responses = _four_at_once(client, voice, streamed=1)
        for response in responses:
            assert response.status_code == 200, response.text
            assert decode(response.content)[0].size > 24000
        if max_batch < 4:
            assert batcher(engine).widest == max_batch
        else:
            assert batcher(engine).widest >= 3  # without lending, one slot means one sequence at a time
        admission = client.app.state.tts.admission
        wait_until(lambda: (admission.running, admission.lent, admission.waiting) == (0, 0, 0), "slots back")


def test_a_client_that_leaves_mid_batch_stops_its_sentence_and_the_others_finish(tmp_path: Path,
                                                                                  long_xtts: Path) -> None:
    """A real server, three streamed XTTS requests decoded together; one client hangs up after its first
    audio. Its sentence stops (it never completes, its slot is freed) and the other two get all their audio:
    as many samples as the same sentence alone (every sentence runs to the checkpoint's 300-token cap)."""
    from tests.conftest import metric, uvicorn_server

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,xtts",
           "TTS_GATEWAY_XTTS_CHECKPOINT": str(long_xtts), "TTS_GATEWAY_CACHE_BYTES": "0",
           "TTS_GATEWAY_TIMEOUT_S": str(HANG_GUARD_S * 4)}
    with uvicorn_server(env) as base:
        assert httpx.post(base + "/v1/engines/xtts/load", timeout=HANG_GUARD_S).status_code == 200
        voice = next(v["name"] for v in httpx.get(base + "/v1/voices", timeout=HANG_GUARD_S).json()["voices"]
                     if v["engine"] == "xtts")
        body = {"voice": voice, "format": "pcm", "stream": True}
        alone = httpx.post(base + "/v1/synthesize", json={**body, "text": TEXTS[0][0], "stream": False},
                           timeout=4 * HANG_GUARD_S)
        assert alone.status_code == 200
        done = metric(base, "tts_synthesis_seconds_count", engine="xtts")
        with httpx.Client(timeout=4 * HANG_GUARD_S) as http:
            streams = [http.stream("POST", base + "/v1/synthesize", json={**body, "text": TEXTS[i][0],
                                                                           "language": TEXTS[i][1]})
                       for i in range(3)]
            responses = [stream.__enter__() for stream in streams]
            readers = [response.iter_raw() for response in responses]
            heard = [[next(chunk for chunk in reader if chunk)] for reader in readers]  # all three have begun
            streams[0].__exit__(None, None, None)  # the first client hangs up
            for i in (1, 2):
                heard[i].extend(chunk for chunk in readers[i] if chunk)
                streams[i].__exit__(None, None, None)
        wait_until(lambda: metric(base, "tts_in_flight") == 0, "the abandoned sentence to stop and free its slot")
        assert metric(base, "tts_synthesis_seconds_count", engine="xtts") == done + 2  # the third never completed
        assert [len(b"".join(heard[i])) for i in (1, 2)] == [len(alone.content)] * 2


def app_engine(client: Any) -> XttsEngine:
    engine = client.app.state.tts.core.engines.get("xtts")
    assert isinstance(engine, XttsEngine)
    return engine


def test_a_row_that_leaves_the_middle_of_the_shared_batch_leaves_the_others_intact(engine: XttsEngine) -> None:
    """Three unseeded-style (shared-row) sequences; the middle one stops early, the last row moves into its
    place, and the others go on with what they would have got alone (up to the rounding of batched
    products)."""
    import torch

    voices = speakers(engine)
    stack = batcher(engine).stack
    texts = [TEXTS[0][0], TEXTS[2][0], TEXTS[3][0]]
    alone = []
    for i, text in enumerate(texts):
        sequence = _sequence(engine, text, voices[i % len(voices)], seed=50 + i, repeatable=False)
        alone.append((list(sequence.latents()), list(sequence.tokens)))
    others = set(alone[0][1]) | set(alone[2][1])
    stop = next(t for t in alone[1][1][3:] if t not in others)
    original = stack.stop_audio_token
    stack.stop_audio_token = stop
    try:
        shared = [_sequence_unsubmitted(engine, text, voices[i % len(voices)], seed=50 + i)
                  for i, text in enumerate(texts)]
        batcher(engine).submit(*shared)  # all three join at the same step
        results = [list(sequence.latents()) for sequence in shared]
    finally:
        stack.stop_audio_token = original
    assert shared[1].tokens == alone[1][1][: alone[1][1].index(stop) + 1]
    for i in (0, 2):
        assert shared[i].tokens == alone[i][1]
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(alone[i][0], results[i], strict=True))


def _sequence_unsubmitted(engine: XttsEngine, text: str, speaker: str, seed: int,
                          repeatable: bool = False, prefix: bool = False) -> Sequence:
    import torch

    from tts_gateway.engines.xtts_streaming import text_tokens

    cond, _ = engine._conditioning(VoiceInput(builtin=speaker))
    with torch.inference_mode():
        prompt = batcher(engine).stack.prompt(cond, text_tokens(engine._model, text, "en"))
    return Sequence(prompt=prompt, seed=seed, repeatable=repeatable, prefix=int(cond.shape[1]) if prefix else 0)


def test_prompts_that_arrive_together_run_as_one_pass_and_give_what_they_give_alone(engine: XttsEngine) -> None:
    """Unseeded sentences of different lengths and voices seated at the same step run their prompts' text as
    one padded pass: each gets the tokens and latents it gets when its prompt runs alone."""
    import torch

    voices = speakers(engine)
    texts = [TEXTS[0][0], TEXTS[2][0] + " " + TEXTS[2][0], TEXTS[1][0]]
    jobs = [(text, voices[i % len(voices)], 80 + i) for i, text in enumerate(texts)]
    alone = []
    for text, voice, seed in jobs:
        sequence = _sequence_unsubmitted(engine, text, voice, seed, prefix=True)
        batcher(engine).submit(sequence)
        alone.append((list(sequence.latents()), list(sequence.tokens)))
    before = batcher(engine).prompts_together
    shared = [_sequence_unsubmitted(engine, text, voice, seed, prefix=True) for text, voice, seed in jobs]
    batcher(engine).submit(*shared)  # all three are seated at the same step
    results = [list(sequence.latents()) for sequence in shared]
    assert batcher(engine).prompts_together == before + 3
    assert len({int(s.prompt.shape[1]) for s in shared}) == 3  # three lengths: padding was needed
    for (latents, tokens), sequence, got in zip(alone, shared, results, strict=True):
        assert sequence.tokens == tokens
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(latents, got, strict=True))


def test_the_stack_computes_what_transformers_gpt2_computes(engine: XttsEngine) -> None:
    """The batcher runs XTTS's GPT-2 by hand (its own cache, slicing or masks, GELU in one kernel): a prompt and
    the steps after it, for a lone row and for rows at different lengths stepping together, give the latents
    transformers' own forward gives each sequence with its key/value cache."""
    import torch

    stack = batcher(engine).stack
    gpt = stack.gpt

    def reference(prompt: Any, steps: list[Any]) -> list[Any]:
        out = gpt.gpt(inputs_embeds=prompt, use_cache=True)
        past, latents = out.past_key_values, [gpt.final_norm(out.last_hidden_state[:, -1])]
        for x in steps:
            out = gpt.gpt(inputs_embeds=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            latents.append(gpt.final_norm(out.last_hidden_state[:, -1]))
        return latents

    @torch.inference_mode()
    def check() -> None:
        generator = torch.Generator().manual_seed(7)
        for block in stack.blocks:  # the tiny model's MLP inputs are small, where GELU's forms barely differ
            block.ln_2.weight.mul_(12)
        prompts = [torch.randn(1, length, stack.width, generator=generator) for length in (9, 5)]
        steps = [[torch.randn(1, 1, stack.width, generator=generator) for _ in range(3)] for _ in prompts]
        want = [reference(p, s) for p, s in zip(prompts, steps, strict=True)]
        lone = stack.cache(1)
        lone.add_row()
        got = [stack.forward(prompts[0], lone, [0])] + [stack.forward(x, lone, [0]) for x in steps[0]]
        for a, b in zip(got, want[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        shared = stack.cache(4)
        rows = [shared.add_row() for _ in prompts]
        first = [stack.forward(p, shared, [row]) for p, row in zip(prompts, rows, strict=True)]
        assert shared.lengths == [9, 5]  # steps from here are masked to each row's own length
        together = [torch.cat(first)] + [stack.forward(torch.cat([s[i] for s in steps]), shared, rows)
                                         for i in range(3)]
        for i, latents in enumerate(together):
            for row in rows:
                torch.testing.assert_close(latents[row: row + 1], want[row][i], rtol=1e-5, atol=1e-6)

    saved = [block.ln_2.weight.detach().clone() for block in stack.blocks]
    try:
        engine._torch.call(check)
    finally:
        with torch.no_grad():
            for block, weight in zip(stack.blocks, saved, strict=True):
                block.ln_2.weight.copy_(weight)


def test_a_prompt_that_cannot_run_with_the_others_fails_alone(engine: XttsEngine) -> None:
    """One sequence whose prompt is malformed (not the model's width) joins with two good ones: the batched
    pass fails, each then runs alone, and only the malformed one fails."""
    import torch

    voices = speakers(engine)
    good = [_sequence_unsubmitted(engine, TEXTS[i][0], voices[0], 90 + i, prefix=True) for i in range(2)]
    broken = Sequence(prompt=torch.zeros(1, 40, 3), seed=1, repeatable=False, prefix=32)
    batcher(engine).submit(good[0], broken, good[1])
    with pytest.raises(RuntimeError):
        list(broken.latents())
    for sequence in good:
        assert len(list(sequence.latents())) == len(sequence.tokens) > 0


def test_another_engine_speaks_between_xtts_steps(make_settings: Any, tiny_xtts: Path) -> None:
    """XTTS takes the cores one GPT step at a time: while its sentence is held between two steps, a Piper
    request gets the cores and finishes, and the XTTS request is still running."""
    from contextlib import contextmanager

    settings = make_settings(engines=("piper", "xtts"), xtts_checkpoint=tiny_xtts, max_concurrency=4)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        assert client.post("/v1/engines/xtts/load").status_code == 200
        xtts_voice = next(v["name"] for v in client.get("/v1/voices").json()["voices"] if v["engine"] == "xtts")
        shared = app_engine(client)._batcher
        assert shared is not None
        real_cores = shared.cores
        permits = threading.Semaphore(3)  # the prompt and two steps, then the sentence waits between steps

        @contextmanager
        def gated(repeatable: bool) -> Iterator[Any]:
            assert permits.acquire(timeout=4 * HANG_GUARD_S)
            with real_cores(repeatable) as threads:
                yield threads

        shared.cores = gated
        results: dict[str, Any] = {}
        xtts = threading.Thread(target=lambda: results.setdefault("xtts", client.post(
            "/v1/synthesize", json={"text": "Held between two steps.", "voice": xtts_voice})))
        xtts.start()
        try:
            wait_until(lambda: shared.steps >= 2 and shared.active == 1, "the XTTS sentence to be mid-way")
            piper = client.post("/v1/synthesize", json={"text": "Piper speaks meanwhile.", "voice": "piper:joe"})
            assert piper.status_code == 200, piper.text
            assert xtts.is_alive() and "xtts" not in results  # XTTS has not finished its sentence
        finally:
            permits.release(10_000)
            xtts.join(4 * HANG_GUARD_S)
            shared.cores = real_cores
        assert results["xtts"].status_code == 200, results["xtts"].text


def test_load_puts_the_gpt_on_measured_kernels_and_int8_is_opt_in(engine: XttsEngine, tiny_xtts: Path) -> None:
    from torch import nn

    assert engine.kernels["precision"] == "fp32"
    assert engine.kernels["kernel"] in ("default", "onednn", "onednn-packed")
    times = {name: ms for name, ms in engine.kernels.items() if name.endswith("_ms")}
    assert times[engine.kernels["kernel"].replace("-", "_") + "_ms"] == min(times.values())  # the fastest measured
    block = batcher(engine).stack.blocks[0]
    assert not hasattr(block.attn.c_attn, "nf")  # transformers' Conv1D became a linear layer
    int8 = XttsEngine(tiny_xtts, precision="int8")
    int8.load()
    try:
        assert int8.kernels["precision"] == "int8" and int8.kernels["kernel"] in INT8_KERNELS
        int8_times = {name: ms for name, ms in int8.kernels.items() if name.endswith("_ms")}
        assert len(int8_times) >= 2  # fbgemm at least, per tensor and per channel (a build's oneDNN too)
        assert choose_kernel({name[:-3].replace("_", "-"): ms for name, ms in int8_times.items()}) \
            == int8.kernels["kernel"]
        layer = batcher(int8).stack.blocks[0].mlp.c_fc
        assert not isinstance(layer, nn.Linear) and "quantized" in type(layer).__module__
        audio = say(int8, TEXTS[0][0], "en", speakers(int8)[0], seed=3)
        assert audio.size > 2400 and np.isfinite(audio).all() and np.abs(audio).max() > 0
    finally:
        int8.unload()


def test_int8_keeps_per_channel_scales_unless_per_tensor_is_clearly_faster() -> None:
    assert choose_kernel({"fbgemm": 10.0, "fbgemm-per-channel": 10.4, "onednn": 12.0}) == "fbgemm-per-channel"
    assert choose_kernel({"fbgemm": 10.0, "fbgemm-per-channel": 11.0, "onednn-per-channel": 10.2}) \
        == "onednn-per-channel"
    assert choose_kernel({"fbgemm": 10.0, "fbgemm-per-channel": 10.6, "onednn": 12.0}) == "fbgemm"
    assert choose_kernel({"default": 5.0, "onednn": 3.0, "onednn-packed": 4.0}) == "onednn"  # fp32: the fastest


def _tiny_gpt2(layers: int) -> Any:
    """Real GPT-2 blocks (transformers'), small: what XTTS's GPT is made of."""
    from tts_gateway.engines.torch_compat import import_torchaudio

    import_torchaudio()  # transformers imports torchaudio when it is installed: through the stub
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=64, vocab_size=10)).eval()


def _int8_error(kernel: str) -> float:
    """The largest difference from fp32 of two real GPT-2 blocks (transformers') on int8 ``kernel``, whose
    MLP weights differ in size by 100× from one output channel to the next (where per channel pays)."""
    import types

    import torch

    from tts_gateway.engines import xtts_kernels

    torch.manual_seed(0)
    model = _tiny_gpt2(2)
    for block in model.h:
        with torch.no_grad():
            block.mlp.c_fc.weight.mul_(torch.logspace(-2, 0, block.mlp.c_fc.weight.shape[1]))
    gpt = types.SimpleNamespace(gpt=model)
    xtts_kernels.linearize(gpt)
    x = torch.randn(4, 3, 64)
    engine = torch.backends.quantized.engine
    with torch.inference_mode():
        want = model(inputs_embeds=x).last_hidden_state
        xtts_kernels.quantize_int8(gpt, kernel)
        assert torch.backends.quantized.engine == engine  # packed for its engine, the process's is back
        layer = model.h[0].mlp.c_fc
        assert "quantized" in type(layer).__module__
        hidden = torch.randn(5, 64)  # its overload called straight computes what the module's own forward does
        assert torch.equal(layer(hidden), type(layer).forward(layer, hidden))
        return float((model(inputs_embeds=x).last_hidden_state - want).abs().max())


def test_int8_off_the_cpu_is_a_clear_error() -> None:
    """PyTorch quantizes dynamically for the CPU only: int8 with the model on another device (here the meta
    device stands in for a GPU) fails the load with a message, instead of running fp32 and saying int8."""

    import torch

    from tts_gateway.engines import xtts_kernels

    with torch.device("meta"):
        model = _tiny_gpt2(1)
    holder = torch.nn.Module()  # like XTTS's GPT: the GPT-2 model is its .gpt
    holder.gpt = model
    with pytest.raises(RuntimeError, match="CPU only"):
        xtts_kernels.prepare(holder, "int8", lambda rows: None)


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_every_int8_kernel_stays_close_to_fp32_and_per_channel_closer(engine: str) -> None:
    """Each int8 kernel the load may choose, per tensor and per channel: near fp32, per channel nearer."""
    import torch

    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"this PyTorch has no {engine} engine")
    per_tensor, per_channel = _int8_error(engine), _int8_error(f"{engine}-per-channel")
    assert 0 < per_channel < per_tensor < 0.5, (per_channel, per_tensor)


@pytest.mark.parametrize("kernel", ["onednn", "onednn-packed"])
def test_every_fp32_kernel_computes_what_the_default_gemm_does(kernel: str) -> None:
    """Real GPT-2 blocks (transformers'), their Conv1D made linear, then put on each kernel the load may
    choose: the hidden states match the default GEMM's for one row, a batch of rows and a prompt."""
    import types

    import torch

    from tts_gateway.engines import xtts_kernels

    torch.manual_seed(0)
    model = _tiny_gpt2(2)
    gpt = types.SimpleNamespace(gpt=model)
    assert xtts_kernels.linearize(gpt) == 8
    inputs = [torch.randn(1, 1, 64), torch.randn(4, 1, 64), torch.randn(1, 23, 64)]
    with torch.inference_mode():
        expected = [model(inputs_embeds=x).last_hidden_state for x in inputs]
        if kernel == "onednn":
            xtts_kernels.to_onednn(gpt)
        else:
            xtts_kernels.to_packed(gpt, 8)
        assert not isinstance(model.h[0].mlp.c_fc, torch.nn.Linear)
        for x, want in zip(inputs, expected, strict=True):
            torch.testing.assert_close(model(inputs_embeds=x).last_hidden_state, want, rtol=1e-4, atol=1e-5)


def test_the_decoder_computes_its_weight_norms_once_and_gives_the_same_audio(engine: XttsEngine,
                                                                           tiny_xtts: Path) -> None:
    """coqui loads XTTS's HiFi-GAN with training's weight norm, recomputed on every call; the engine folds it
    at load: the loaded engine's decoder has none left, and folding gives the very same samples."""
    import torch
    from torch.nn.utils import parametrize
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    from tts_gateway.engines.xtts_kernels import fold_weight_norm

    loaded = engine._require_model().hifigan_decoder
    assert engine.kernels["decoder_weight_norms_folded"] > 0
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    def coqui() -> Any:  # two loads: a weight-normed module does not survive copy.deepcopy
        config = XttsConfig()
        config.load_json(str(tiny_xtts / "config.json"))
        model = Xtts(config)
        model.load_checkpoint(config, checkpoint_dir=str(tiny_xtts), eval=True)
        return model

    model = coqui()
    decoder, folded = model.hifigan_decoder, coqui().hifigan_decoder
    assert fold_weight_norm(folded) == engine.kernels["decoder_weight_norms_folded"]
    torch.manual_seed(0)
    latents, speaker = torch.randn(1, 9, model.args.gpt_n_model_channels), torch.randn(1, 512, 1)
    with torch.inference_mode():
        assert torch.equal(folded(latents, g=speaker), decoder(latents, g=speaker))


def test_the_decoder_runs_on_the_faster_measured_layout_and_both_give_the_same_audio(engine: XttsEngine,
                                                                                   tiny_xtts: Path) -> None:
    """The decoder's convolutions run plain or channels-last, whichever was faster at load (both timings
    kept); channels-last computes the plain samples up to float rounding, whole and streamed, and turning it
    back gives the plain samples exactly."""
    import copy
    from types import SimpleNamespace

    import torch

    from tests.test_xtts_streaming import snr_db
    from tts_gateway.engines.xtts_kernels import to_channels_last, to_plain
    from tts_gateway.engines.xtts_streaming import decode_latents

    kernels = engine.kernels
    assert kernels["decoder_layout"] in ("plain", "channels-last")
    if "decoder_channels_last_ms" in kernels:
        faster = "channels-last" if kernels["decoder_channels_last_ms"] < kernels["decoder_plain_ms"] else "plain"
        assert kernels["decoder_layout"] == faster
    model = engine._require_model()
    decoder = copy.deepcopy(model.hifigan_decoder)  # weight norms are folded: a deep copy is safe
    to_plain(decoder)
    torch.manual_seed(1)
    latents = torch.randn(1, 30, model.args.gpt_n_model_channels)
    speaker = torch.nn.functional.normalize(torch.randn(1, 512, 1), dim=1)
    with torch.inference_mode():
        plain = decoder(latents, g=speaker).reshape(-1)
        assert to_channels_last(decoder) > 10
        channels_last = decoder(latents, g=speaker).reshape(-1)
        streamed = torch.cat(list(decode_latents(SimpleNamespace(hifigan_decoder=decoder), latents[0].split(1),
                                                 speaker)))
        to_plain(decoder)
        again = decoder(latents, g=speaker).reshape(-1)
    assert snr_db(plain.numpy(), channels_last.numpy()) > 60
    assert snr_db(channels_last.numpy(), streamed.numpy()) > 60
    assert torch.equal(plain, again)


def test_the_precision_setting_is_checked() -> None:
    from tts_gateway.config import Settings, SettingsError

    assert Settings.from_env({"TTS_GATEWAY_XTTS_PRECISION": "INT8"}).xtts_precision == "int8"
    with pytest.raises(SettingsError, match="fp32 or int8"):
        Settings.from_env({"TTS_GATEWAY_XTTS_PRECISION": "fp16"})
    with pytest.raises(SettingsError):
        Settings.from_env({"TTS_GATEWAY_XTTS_MAX_BATCH": "-1"})


def test_wyoming_requests_reach_the_batcher_together(tmp_path: Path, tiny_xtts: Path) -> None:
    """Two Home Assistant clients at once, each a synthesize of three sentences with an XTTS voice: both get
    their audio, and the server's batch-size histogram shows GPT steps that carried both."""
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families
    from wyoming.audio import AudioChunk, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize, SynthesizeVoice

    from tests.conftest import free_port, uvicorn_server

    port = free_port()
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,xtts",
           "TTS_GATEWAY_XTTS_CHECKPOINT": str(tiny_xtts), "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{port}",
           "TTS_GATEWAY_MAX_CONCURRENCY": "4"}
    with uvicorn_server(env) as base:
        assert httpx.post(base + "/v1/engines/xtts/load", timeout=HANG_GUARD_S).status_code == 200
        voice = next(v["name"] for v in httpx.get(base + "/v1/voices", timeout=HANG_GUARD_S).json()["voices"]
                     if v["engine"] == "xtts")

        async def speak() -> int:
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Synthesize(text="One sentence here. Another one there. And a third.",
                                                    voice=SynthesizeVoice(name=voice)).event())
                audio = 0
                while True:
                    event = await asyncio.wait_for(client.read_event(), HANG_GUARD_S)
                    assert event is not None and event.type != "error", event
                    if AudioChunk.is_type(event.type):
                        audio += len(AudioChunk.from_event(event).audio)
                    if AudioStop.is_type(event.type):
                        return audio

        async def both() -> list[int]:
            return list(await asyncio.gather(speak(), speak()))

        assert all(size > 4800 for size in asyncio.run(both()))
        text = httpx.get(base + "/metrics", timeout=HANG_GUARD_S).text
        samples = {(s.name, s.labels.get("le")): s.value for family in text_string_to_metric_families(text)
                   for s in family.samples if s.labels.get("engine") == "xtts" and s.name.startswith("tts_batch")}
        assert samples[("tts_batch_size_count", None)] > samples[("tts_batch_size_bucket", "1.0")], samples


def test_compare_precision_reports_tokens_logits_similarity_and_time(tiny_xtts: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "compare-precision", "--checkpoint",
                             str(tiny_xtts), "--json"], capture_output=True, text=True, timeout=4 * HANG_GUARD_S,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["kernels"]["int8"]["precision"] == "int8" and len(report["sentences"]) == 4
    for row in report["sentences"]:
        assert 0 <= row["identical_token_share"] <= 1 and row["tokens"][0] > 0
        assert 0 < row["first_logits_max_abs_diff"] < 1  # int8 is close to fp32, never identical
        assert -1 <= row["speaker_similarity"] <= 1.0001 and all(s > 0 for s in row["seconds"])
    assert report["int8_speed_up"] > 0


def test_tiny_xtts_size_and_token_cap_are_options(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "tiny-xtts", str(tmp_path / "x"), "--size",
                          "huge"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert bad.returncode == 2 and "tiny or v2" in bad.stderr
    made = subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "tiny-xtts", str(tmp_path / "t"),
                           "--max-audio-tokens", "20"], capture_output=True, text=True, timeout=4 * HANG_GUARD_S)
    assert made.returncode == 0, made.stderr
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["model_args"]["gpt_max_audio_tokens"] == 20 and config["model_args"]["gpt_layers"] == 2


def test_an_idle_batch_gives_back_the_cache_a_long_sentence_grew(engine: XttsEngine) -> None:
    from tts_gateway.engines import xtts_batching

    shared = batcher(engine)
    say(engine, TEXTS[3][0], "en", speakers(engine)[0], seed=5, repeatable=False)
    wait_until(lambda: shared.active == 0, "the batch to empty")
    assert shared._shared.capacity == xtts_batching._INITIAL_LENGTH and shared._shared.lengths == []
    assert shared._shared.rows == 1


def test_the_cache_grows_rows_and_positions_as_they_are_needed_and_keeps_what_it_holds() -> None:
    """A cache for 4 rows allocates one at first (a lone sentence copies one row's worth when it grows), then
    doubles; what the rows hold survives every growth, and a fifth row is refused."""
    import torch

    from tts_gateway.engines.xtts_batching import _INITIAL_LENGTH, KVCache

    cache = KVCache(layers=2, heads=2, head_dim=3, rows=4, like=torch.zeros(1))
    assert (cache.rows, cache.capacity) == (1, _INITIAL_LENGTH)
    prefixes = []
    for row in range(4):
        assert cache.add_row() == row
        prefix = [(torch.randn(2, 5 + row, 3), torch.randn(2, 5 + row, 3)) for _ in range(2)]
        cache.load_prefix(row, prefix)
        prefixes.append(prefix)
        assert cache.rows == {0: 1, 1: 2, 2: 4, 3: 4}[row]
    cache.reserve(_INITIAL_LENGTH + 1)
    assert cache.capacity == 2 * _INITIAL_LENGTH and cache.lengths == [5, 6, 7, 8]
    for row, prefix in enumerate(prefixes):
        for layer, (keys, values) in enumerate(prefix):
            assert torch.equal(cache.keys[layer][row, :, : 5 + row], keys)
            assert torch.equal(cache.values[layer][row, :, : 5 + row], values)
    with pytest.raises(RuntimeError, match="4 rows"):
        cache.add_row()


@pytest.mark.parametrize("repeatable", [True, False])
def test_a_whole_sentence_gives_back_the_cores_before_its_audio_is_taken(engine: XttsEngine, repeatable: bool) -> None:
    """The decode of an unstreamed sentence holds the core budget only while it runs: a consumer that takes
    the audio and then stops (a cancel, a timeout; its traceback keeps the generator alive) must not keep
    the cores, or every engine of the process would wait forever."""
    from tts_gateway.engines.scheduling import shared_budget

    cancel = threading.Event()
    options = SynthesisOptions(language="en", seed=3, repeatable=repeatable, cancel=cancel)
    chunks = engine.synthesize(TEXTS[2][0], VoiceInput(builtin=speakers(engine)[0]), options)
    assert next(chunks).size > 2400
    assert shared_budget().in_use == 0
    cancel.set()
    with pytest.raises(SynthesisCancelled) as stopped:
        next(chunks)
    assert stopped.value.__traceback__ is not None and shared_budget().in_use == 0
    with shared_budget().slot(threads=shared_budget().cores):  # the whole machine is free to take
        pass


def test_an_unseeded_sentence_is_decoded_beside_its_gpt_steps_on_one_core(engine: XttsEngine, monkeypatch: Any) -> None:
    """While a whole unseeded sentence still has GPT steps to come, its audio so far is decoded on the
    narrow thread with one intra-op thread (the steps take the other core); held after its first chunk's
    tokens, the GPT waits for that decode. The answer is one piece, as long as the same sentence decoded
    once at the end (a seeded request's path); a seeded request's decodes never leave the torch thread."""
    import torch

    shared = batcher(engine)
    narrow = engine._narrow
    beside: list[tuple[str, int]] = []  # (text, intra-op threads) of each call run on the narrow thread
    decoded = threading.Event()
    current = {"text": ""}

    def spied(fn: Any, urgent: bool = False) -> Any:
        def run() -> Any:
            value = fn()
            beside.append((current["text"], torch.get_num_threads()))
            decoded.set()
            return value

        return narrow.call(run, urgent=urgent)

    monkeypatch.setattr(engine, "_narrow", type("Spy", (), {"call": staticmethod(spied)})())
    real_cores = shared.cores
    held_at = shared.steps + 30  # past the first chunk's 24 tokens, before the sentence's last (48)

    def gated(repeatable: bool) -> Any:
        if shared.steps >= held_at and not decoded.is_set():
            decoded.wait(HANG_GUARD_S)  # on the torch thread: a missing decode fails below, never hangs
        return real_cores(repeatable)

    monkeypatch.setattr(shared, "cores", gated)
    speaker = speakers(engine)[0]
    current["text"] = TEXTS[3][0]
    options = SynthesisOptions(language="en", seed=4, repeatable=False)
    chunks = list(engine.synthesize(TEXTS[3][0], VoiceInput(builtin=speaker), options))
    assert decoded.is_set() and beside and {threads for _, threads in beside} == {1}
    assert len(chunks) == 1
    current["text"] = "seeded"
    seeded = say(engine, TEXTS[3][0], "en", speaker, seed=4)
    assert chunks[0].size == seeded.size > 2400
    assert all(text != "seeded" for text, _ in beside)


def test_an_unseeded_gpt_step_takes_the_cores_that_are_free_and_a_seeded_one_its_fixed_count(
        engine: XttsEngine) -> None:
    """The core budget's slot decides torch's threads on the thread that computes: every free core for an
    unseeded step, one while another call holds a core, the engine's count for a seeded step."""
    import torch

    from tts_gateway.engines.scheduling import shared_budget

    def threads_for(repeatable: bool) -> tuple[int, int]:
        def inside() -> tuple[int, int]:
            with batcher(engine).cores(repeatable) as granted:
                return granted, torch.get_num_threads()

        return engine._torch.call(inside)

    budget = shared_budget()
    full = min(budget.cores, engine._threads)
    assert threads_for(False) == (full, full)
    assert threads_for(True) == (engine._threads, engine._threads)
    if budget.cores > 1:
        with budget.slot(threads=1):  # a decode beside, or another engine's call
            assert threads_for(False) == (1, 1)
    assert threads_for(False) == (full, full)


class _Held:
    """Holds the engine's torch thread (a call that waits) until the block ends: no batcher round runs."""

    def __init__(self, engine: XttsEngine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.running = threading.Event()

    def __enter__(self) -> _Held:
        def hold() -> None:
            self.running.set()
            self.gate.wait(4 * HANG_GUARD_S)

        self.thread = threading.Thread(target=lambda: self.engine._torch.call(hold), daemon=True)
        self.thread.start()
        assert self.running.wait(HANG_GUARD_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.thread.join(HANG_GUARD_S)


def test_a_sequence_has_its_seat_when_it_is_queued_if_one_is_free(tiny_xtts: Path) -> None:
    """Seats are given at submit, before any round: its request lends its admission slot at once, and the
    next request's prompt can join the same round. Past the batch size a sequence waits for a seat (and
    its request keeps its slot), and gets one when a seat frees."""
    engine = XttsEngine(tiny_xtts, max_batch=2)
    engine.load()
    try:
        voice = speakers(engine)[0]
        sequences = [_sequence_unsubmitted(engine, TEXTS[i][0], voice, seed=i) for i in range(3)]
        with _Held(engine):
            batcher(engine).submit(sequences[0])
            batcher(engine).submit(*sequences[1:])
            assert [s.seated.is_set() for s in sequences] == [True, True, False]
            assert batcher(engine).active == 0  # no round has run: the seats were given at submit
        for sequence in sequences:
            assert len(list(sequence.latents())) == len(sequence.tokens) > 0
        assert sequences[2].seated.is_set() and batcher(engine).widest == 2
    finally:
        engine.unload()


def test_requests_that_come_while_a_round_runs_join_the_next_one_together(engine: XttsEngine) -> None:
    """Each request queues its prompt on the torch thread: requests that come while it is busy (a round, a
    decode) are all queued before the next round and run their prompts as one pass, instead of one round
    each (three rounds of prompts before the last request's first step)."""
    voices = speakers(engine)
    before = batcher(engine).prompts_together
    with ThreadPoolExecutor(3) as pool:
        with _Held(engine):
            futures = [pool.submit(say, engine, TEXTS[i][0], "en", voices[i % len(voices)], 40 + i,
                                   repeatable=False) for i in range(3)]
            wait_until(lambda: len(engine._torch._urgent) == 3, "the three prompts queued on the torch thread")
        outs = [f.result(timeout=4 * HANG_GUARD_S) for f in futures]
    assert all(o.size > 2400 for o in outs)
    assert batcher(engine).prompts_together == before + 3
