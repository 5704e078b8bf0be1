"""XTTS serving many listeners at once (issue 31), on the random-weight checkpoint of XTTS v2's real size.

Random weights never stop early, so every sentence makes the checkpoint's capped number of audio tokens
(72, ~3.3 s of audio): costs are real, the audio is noise. Figures, one run, both cores:

* HTTP, a real server with default settings (admission lets 2 requests run on 2 cores; requests in the
  GPT batch lend their slot, so all four share steps): audio seconds per
  second with 4 concurrent clients ÷ with 1 client; median time to first audio of 4 concurrent streams ÷
  that of one alone; a one-sentence Piper request while an XTTS batch runs ÷ the same alone.
* In-process: a lone request on the batched engine ÷ the same sentence through coqui's own
  ``inference_stream`` (the path before batching; a second copy of the model, untouched), paired rounds;
  real-time factor with 1 and 2 torch threads; tokens per second of one batched GPT step at batch 1, 2, 4, 8;
  int8: lone real-time factor, speed-up over fp32, logits error against fp32, 4 clients ÷ 1 client.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from benchmarks.common import Budget, Context, Figure, Result, Server, median, paired, running, settle, wav_seconds
from benchmarks.xtts_real_size import TEXT, real_size_checkpoint

TEXTS = [TEXT, "A large size in stockings is hard to sell.", "The box was thrown beside the parked truck.",
         "Four hours of steady work faced us."]


def _together(calls: list[Any]) -> list[Any]:
    barrier = threading.Barrier(len(calls))

    def run(call: Any) -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, c) for c in calls]]


def _http(ctx: Context, result: Result, checkpoint: Any, rounds: int, budget: Budget) -> None:
    import httpx

    env = {"TTS_GATEWAY_ENGINES": "piper,xtts", "TTS_GATEWAY_XTTS_CHECKPOINT": str(checkpoint),
           "TTS_GATEWAY_CANARY": "0"}
    with running(Server("xtts-batching", ctx.workdir, env)) as server:
        base = server.base
        assert httpx.post(base + "/v1/engines/xtts/load", timeout=900).status_code == 200
        voice = next(v["name"] for v in httpx.get(base + "/v1/voices", timeout=60).json()["voices"]
                     if v["engine"] == "xtts")

        def whole(i: int) -> tuple[float, float]:
            begin = time.perf_counter()
            response = httpx.post(base + "/v1/synthesize", timeout=900,
                                  json={"text": TEXTS[i % 4], "voice": voice, "format": "wav"})
            response.raise_for_status()
            return time.perf_counter() - begin, wav_seconds(response.content)

        def first_audio(i: int) -> float:
            begin = time.perf_counter()
            with httpx.stream("POST", base + "/v1/synthesize", timeout=900,
                              json={"text": TEXTS[i % 4], "voice": voice, "format": "pcm", "stream": True}) as r:
                r.raise_for_status()
                first = None
                for chunk in r.iter_bytes():
                    if chunk and first is None:
                        first = time.perf_counter() - begin
                return first or 0.0

        def piper(seed: int) -> float:  # a new seed each call: never an answer from the phrase cache
            begin = time.perf_counter()
            httpx.post(base + "/v1/synthesize", timeout=900,
                       json={"text": "The quick brown fox jumps over the lazy dog.", "voice": "piper:joe",
                             "format": "wav", "seed": seed}).raise_for_status()
            return time.perf_counter() - begin

        whole(0)  # warm
        one: list[float] = []
        four: list[float] = []
        ttfa_one: list[float] = []
        ttfa_four: list[float] = []
        piper_alone: list[float] = []
        piper_busy: list[float] = []
        for r in range(rounds):
            if r and budget.spent():
                result.notes.append(f"HTTP: time budget spent after {r} rounds")
                break
            wall, audio = whole(r)
            one.append(audio / wall)
            begin = time.perf_counter()
            outs = _together([lambda i=i: whole(i) for i in range(4)])
            four.append(sum(a for _, a in outs) / (time.perf_counter() - begin))
            ttfa_one.append(first_audio(r))
            ttfa_four.append(median(_together([lambda i=i: first_audio(i) for i in range(4)])))
            settle()
            piper_alone.append(piper(100 + 2 * r))
            xtts = threading.Thread(target=lambda: _together([lambda i=i: whole(i) for i in range(2)]))
            xtts.start()
            time.sleep(2.0)  # the two XTTS sentences are in their GPT steps
            piper_busy.append(piper(101 + 2 * r))
            xtts.join()
    result.figures.append(paired("XTTS over HTTP: audio s per s, 4 concurrent clients ÷ 1 client", four, one,
                                 {"four_clients_audio_s_per_s": median(four), "one_client_audio_s_per_s": median(one)},
                                 target=(">=", 3.0)))
    result.figures.append(paired("XTTS streamed: median first audio of 4 concurrent ÷ one alone", ttfa_four, ttfa_one,
                                 {"four_ttfa_s": median(ttfa_four), "one_ttfa_s": median(ttfa_one)},
                                 target=("<=", 2.0)))
    result.figures.append(paired("Piper sentence during an XTTS batch ÷ alone", piper_busy, piper_alone,
                                 {"busy_s": median(piper_busy), "alone_s": median(piper_alone)}, target=("<=", 2.0)))


def _in_process(ctx: Context, result: Result, checkpoint: Any, rounds: int) -> None:
    import torch

    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.xtts_batching import GptStack, probe_step
    from tts_gateway.engines.xtts_engine import XttsEngine
    from tts_gateway.engines.xtts_streaming import text_tokens

    # Every torch call here goes to the engine's torch thread, as the engine's own do: torch work on a second
    # thread would give OpenMP a second pool and slow both (see tts_gateway/engines/torch_thread.py).
    engine = XttsEngine(checkpoint, device="cpu", threads=2)
    engine.load()
    on_torch = engine._torch.call
    before = XttsEngine(checkpoint, device="cpu", threads=2)  # coqui's generate on an untouched copy
    before.load()
    try:
        speaker = engine.voices()[0].id
        voice = VoiceInput(builtin=speaker)
        cond, embedding = engine._conditioning(voice)

        def now(seed: int, engine: XttsEngine = engine) -> tuple[float, float]:
            begin = time.perf_counter()
            audio = np.concatenate(list(engine.synthesize(TEXT, voice, SynthesisOptions(language="en", seed=seed))))
            return time.perf_counter() - begin, audio.size / engine.sample_rate

        def coqui(seed: int) -> None:
            torch.set_num_threads(2)  # as the engine: its calls set the torch thread's count per call
            torch.manual_seed(seed)
            with torch.inference_mode():
                for _ in before._model.inference_stream(TEXT, "en", cond, embedding, enable_text_splitting=False,
                                                        stream_chunk_size=0):
                    pass

        def today(seed: int) -> float:
            begin = time.perf_counter()
            on_torch(lambda: coqui(seed))
            return time.perf_counter() - begin

        now(0)
        today(0)
        mine: list[float] = []
        old: list[float] = []
        audio_s = 0.0
        for r in range(rounds):
            for side in ("now", "today") if r % 2 == 0 else ("today", "now"):
                if side == "now":
                    wall, audio_s = now(r + 1)
                    mine.append(wall)
                else:
                    old.append(today(r + 1))
        result.figures.append(paired("lone XTTS request, batched engine ÷ coqui's inference_stream (before)", mine,
                                     old, {"now_s": median(mine), "before_s": median(old)}, target=("<=", 1.05),
                                     kernels=engine.kernels, audio_s=round(audio_s, 2)))
        rtf = {}
        for threads in (1, 2):
            engine._threads = threads  # the engine's count: its calls set torch's (per thread) to at most this
            rtf[threads] = median([w / a for w, a in (now(40 + i) for i in range(max(1, rounds - 1)))])
        result.figures.append(Figure("lone XTTS request real-time factor (1 thread; 2 threads in medians)", rtf[1],
                                     "s/s", medians={"rtf_1_thread": rtf[1], "rtf_2_threads": rtf[2]}))

        stack = GptStack(engine._model.gpt)

        def step_seconds(rows: int) -> float:
            probe_step(stack, rows)
            samples = []
            for _ in range(3):
                begin = time.perf_counter()
                probe_step(stack, rows)
                samples.append(time.perf_counter() - begin)
            return median(samples)

        per_batch = {rows: rows / on_torch(partial(step_seconds, rows)) for rows in (1, 2, 4, 8)}
        result.figures.append(Figure("batched GPT step: tokens per second at batch 4 ÷ batch 1",
                                     per_batch[4] / per_batch[1], "×",
                                     medians={f"tokens_per_s_batch_{k}": v for k, v in per_batch.items()}))

        # int8 against fp32: the same prompt's first logits, a lone request, and 4 clients ÷ 1.
        before.unload()
        int8 = XttsEngine(checkpoint, device="cpu", threads=2, precision="int8")
        int8.load()
        try:
            tokens = text_tokens(engine._model, TEXT, "en")

            def first_logits(e: XttsEngine) -> Any:
                with torch.inference_mode():
                    s = e._batcher.stack  # type: ignore[union-attr]
                    cache = s.cache(1)
                    cache.add_row()
                    return s.logits(s.forward(s.prompt(cond, tokens), cache, [0]))[0]

            logits = {name: on_torch(partial(first_logits, e)) for name, e in (("fp32", engine), ("int8", int8))}
            error = (logits["int8"] - logits["fp32"]).abs()
            now(0, int8)
            fp32_lone = [now(60 + i)[0] for i in range(max(1, rounds - 1))]
            int8_runs = [now(60 + i, int8) for i in range(max(1, rounds - 1))]
            int8_lone = [w for w, _ in int8_runs]
            int8_rtf = median([w / a for w, a in int8_runs])
            begin = time.perf_counter()
            outs = _together([lambda i=i: now(70 + i, int8) for i in range(4)])
            four = sum(a for _, a in outs) / (time.perf_counter() - begin)
            one = median([a / w for w, a in int8_runs])
        finally:
            int8.unload()
        result.figures.append(Figure("int8: lone request real-time factor", int8_rtf, "s/s", target=("<=", 1.0),
                                     medians={"int8_s": median(int8_lone), "fp32_s": median(fp32_lone)},
                                     detail={"speed_up_over_fp32": round(median(fp32_lone) / median(int8_lone), 2),
                                             "logits_max_abs_error": round(float(error.max()), 4),
                                             "logits_mean_abs_error": round(float(error.mean()), 5),
                                             "four_clients_over_one": round(four / one, 2)}))
    finally:
        engine.unload()
        before.unload()


def run(ctx: Context, result: Result) -> None:
    checkpoint = real_size_checkpoint(ctx)
    rounds = 1 if ctx.quick else 2
    budget = Budget(300 if ctx.quick else 1200)
    _in_process(ctx, result, checkpoint, rounds + 1)
    _http(ctx, result, checkpoint, rounds, budget)
