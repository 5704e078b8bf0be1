"""XTTS streaming: the gateway's incremental decoder vs coqui-tts's ``inference_stream`` vs one decode.

For sentences of N GPT tokens (about 21.5 tokens per second of audio) on a tiny random-weight checkpoint
built with room for long sentences (random weights never emit the stop token, so generation is capped
at exactly N), three ways to make the same audio with the same seed, interleaved:

* ``one_shot``: coqui's ``inference_stream(stream_chunk_size=0)`` — one decode at the end (unstreamed);
* ``ours``: `tts_gateway.engines.xtts_streaming.stream_inference` — the decoder run incrementally, each
  layer computing each sample once;
* ``coqui``: ``inference_stream(stream_chunk_size=20)`` — re-decodes every latent so far at each chunk.

Compute is the process's CPU time (``time.process_time``: every thread, but not the time other processes
take on a shared machine); time to first audio is wall time. Figures: streamed/unstreamed compute for
both streamers (ours stays flat as N grows, coqui's grows
linearly, i.e. its total is quadratic), the SNR of each streamed waveform against the one-shot one, and
the time to first audio. The tiny GPT is 2 layers wide 64, so decoding dominates here far more than on
real XTTS v2, where the 30-layer GPT is most of the work: the ratios are an upper bound on the gain.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE_DIR, Budget, Context, Figure, Result, median, paired

MAX_TOKENS = 400


def long_checkpoint(ctx: Context) -> Path:
    """The tiny checkpoint with room for MAX_TOKENS audio tokens (built once, kept in .cache/bench)."""
    from tts_gateway.engines.tiny_xtts import build_tiny_xtts

    target = CACHE_DIR / f"tiny-xtts-{MAX_TOKENS}"
    if not (target / "speakers_xtts.pth").is_file():
        ctx.log(f"building a tiny XTTS checkpoint with {MAX_TOKENS} audio tokens (once; kept in .cache/bench)")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix="tiny-xtts-long-", dir=CACHE_DIR))
        try:
            build_tiny_xtts(building, max_audio_tokens=MAX_TOKENS)
            shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    n = min(reference.size, other.size)
    noise = float(np.sum((reference[:n] - other[:n]) ** 2)) + float(np.sum(reference[n:] ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference ** 2)) / noise)


def run(ctx: Context, result: Result) -> None:
    import torch

    from tts_gateway.engines.xtts_engine import XttsEngine
    from tts_gateway.engines.xtts_streaming import stream_inference

    engine = XttsEngine(long_checkpoint(ctx), device="cpu", threads=ctx.threads)
    engine.load()
    model = engine._model
    speaker = engine._speakers.speakers(engine.checkpoint).get("claribel-dervla")
    assert speaker is not None
    gpt, embedding = speaker.gpt_cond_latent, speaker.speaker_embedding
    text = "The birch canoe slid on the smooth planks."
    lengths = [48, 160] if ctx.quick else [48, 160, 320]
    rounds = 1 if ctx.quick else 3
    budget = Budget(240 if ctx.quick else 1500)

    def timed(kind: str, seed: int) -> tuple[float, float, np.ndarray]:
        """(CPU seconds for the whole sentence, wall seconds to the first chunk, the waveform)."""
        torch.manual_seed(seed)
        cpu = time.process_time()
        started = time.perf_counter()
        if kind == "ours":
            stream: Any = stream_inference(model, text, "en", gpt, embedding)
        else:
            stream = model.inference_stream(text, "en", gpt, embedding, enable_text_splitting=False,
                                            stream_chunk_size=20 if kind == "coqui" else 0)
        first = None
        chunks = []
        for chunk in stream:
            if first is None:
                first = time.perf_counter() - started
            chunks.append(chunk.detach().cpu().numpy().reshape(-1))
        return time.process_time() - cpu, first or 0.0, np.concatenate(chunks)

    original = model.gpt.max_gen_mel_tokens
    try:
        for tokens in lengths:
            if budget.spent():
                result.notes.append(f"time budget spent before N={tokens}")
                break
            model.gpt.max_gen_mel_tokens = tokens
            totals: dict[str, list[float]] = {"one_shot": [], "ours": [], "coqui": []}
            firsts: dict[str, list[float]] = {"one_shot": [], "ours": [], "coqui": []}
            snrs: dict[str, list[float]] = {"ours": [], "coqui": []}
            audio_s = 0.0
            for r in range(rounds):
                order = ["one_shot", "ours", "coqui"] if r % 2 == 0 else ["coqui", "ours", "one_shot"]
                waves: dict[str, np.ndarray] = {}
                for kind in order:
                    # on the engine's torch thread: one OpenMP pool (tts_gateway/engines/torch_thread.py)
                    total, first, wave = engine._torch.call(partial(timed, kind, 100 + r))
                    totals[kind].append(total)
                    firsts[kind].append(first)
                    waves[kind] = wave
                audio_s = waves["one_shot"].size / engine.sample_rate
                for kind in snrs:
                    snrs[kind].append(snr_db(waves["one_shot"], waves[kind]))
            medians = {f"{k}_cpu_s": median(v) for k, v in totals.items()}
            detail: dict[str, Any] = {"tokens": tokens, "audio_seconds": round(audio_s, 2), "rounds": rounds}
            result.figures.append(paired(f"N={tokens}: ours streamed / unstreamed compute", totals["ours"],
                                         totals["one_shot"], medians, target=("<=", 1.15), **detail))
            result.figures.append(paired(f"N={tokens}: coqui inference_stream / unstreamed compute",
                                         totals["coqui"], totals["one_shot"], medians, **detail))
            result.figures.append(Figure(f"N={tokens}: SNR ours streamed vs one-shot", min(snrs["ours"]), "dB",
                                         (">=", 30.0), detail={**detail, "coqui_snr_db": min(snrs["coqui"])}))
            result.figures.append(Figure(
                f"N={tokens}: time to first audio, ours", median(firsts["ours"]), "s",
                medians={f"ttfa_{k}_s": median(v) for k, v in firsts.items()}, detail=detail))
            ctx.log(f"N={tokens}: CPU one-shot {medians['one_shot_cpu_s']:.2f}s, ours {medians['ours_cpu_s']:.2f}s, "
                    f"coqui {medians['coqui_cpu_s']:.2f}s; SNR ours {min(snrs['ours']):.1f} dB, "
                    f"coqui {min(snrs['coqui']):.1f} dB; TTFA ours {median(firsts['ours']):.2f}s, "
                    f"coqui {median(firsts['coqui']):.2f}s")
    finally:
        model.gpt.max_gen_mel_tokens = original
        engine.unload()
