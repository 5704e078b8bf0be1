"""What a preset costs over the raw engine, and what it saves over uploading audio every time."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks.common import Budget, Context, Result, interleave, median, paired, ratio_figure, wav_bytes
from benchmarks.texts import ONE_SENTENCE

SEED = 7
LEGACY_RATE = 16000


def run(ctx: Context, result: Result) -> None:
    in_process(ctx, result)
    over_http(ctx, result)


def in_process(ctx: Context, result: Result) -> None:
    """Preset through SynthesisService (plan + run + encode) vs XttsEngine.synthesize + encode."""
    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.xtts_engine import XttsEngine

    inproc = ctx.inproc()
    preset = ctx.inproc_preset()
    engine = inproc.engines.ensure_loaded("xtts")
    assert isinstance(engine, XttsEngine)
    latents = inproc.registry.latents(inproc.registry.get(preset))  # verified, then kept in memory

    inside: list[float] = []  # seconds spent inside engine.synthesize during each service call
    totals: list[float] = []

    def timed_engine(text: str, voice: Any, options: Any) -> Iterator[np.ndarray]:
        chunks = XttsEngine.synthesize(engine, text, voice, options)
        spent = 0.0
        while True:
            started = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            finally:
                spent += time.perf_counter() - started
            yield chunk
        inside.append(spent)

    def service() -> bytes:
        # The service calls engine.synthesize; for the call's duration that is a timing wrapper,
        # so each call also tells how much of it the engine itself took.
        engine.synthesize = timed_engine  # type: ignore[method-assign]
        started = time.perf_counter()
        try:
            return inproc.synthesize(ONE_SENTENCE, voice=preset, seed=SEED, format="wav")
        finally:
            totals.append(time.perf_counter() - started)
            del engine.synthesize

    def raw() -> bytes:
        options = SynthesisOptions(language="en", seed=SEED, repeatable=True)
        audio = np.concatenate(list(engine.synthesize(ONE_SENTENCE, VoiceInput(latents=latents), options)))
        return wav_bytes(audio, engine.sample_rate)

    outputs: dict[str, bytes] = {}
    cpu: dict[str, list[float]] = {}
    samples = interleave({"service": service, "raw": raw}, 1 if ctx.quick else 8, Budget(30 if ctx.quick else 150),
                         warmup=0 if ctx.quick else 1, min_rounds=1, on_value=outputs.setdefault, cpu=cpu)
    same = outputs["service"] == outputs["raw"]
    result.figures.append(ratio_figure("XTTS preset via service / raw engine (same text, seed)", samples,
                                       "service", "raw", target=("<=", 1.02), identical_audio=same))
    if ctx.threads == 1:  # torch runs single-threaded (on XTTS's torch thread): the process's CPU time is the work
        result.figures.append(ratio_figure("  same, CPU time of the process", cpu, "service", "raw",
                                           target=("<=", 1.02), identical_audio=same))
    calls = len(inside)  # warm-up included: each call is its own pair
    result.figures.append(paired(
        "  same, service call / its own time inside the engine", totals[-calls:], inside,
        {"service call": median(totals[-calls:]), "inside engine": median(inside)}, target=("<=", 1.02),
        method="per service call: wall time / time inside XttsEngine.synthesize (a wrapper times it)",
    ))


def variants(wav: bytes) -> Any:
    """Endless distinct versions of the reference clip: each one a cache miss for the upload cache.

    Each drops a different number of leading samples and adds its own -80 dBFS dither, so the
    normalised 16-bit audio (what the cache key hashes) differs while the speech stays the same.
    """
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    for index in itertools.count(1):
        rng = np.random.default_rng(index)
        clip = audio[(index * 37) % 1500 :] + rng.normal(0, 1e-4, audio.size - (index * 37) % 1500)
        yield wav_bytes(clip.astype(np.float32), rate)


def over_http(ctx: Context, result: Result) -> None:
    """Legacy ``/synthesize`` with new audio each time vs ``/v1/synthesize`` by preset (same server)."""
    import httpx

    from tts_gateway.voices import prepare_reference

    server = ctx.server()
    preset = ctx.server_preset()
    no_cache = ctx.no_cache()
    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = ctx.inproc().engines.ensure_loaded("xtts")
    assert isinstance(engine, XttsEngine)
    uploads = variants(ctx.speech_wav())
    seeds = itertools.count(SEED)
    client = httpx.Client(base_url=server.base, timeout=600)
    conditioned_before = server.metric("tts_conditioning_computations_total", {"engine": "xtts"})
    upload_calls = 0
    lock = threading.Lock()

    def upload() -> bytes:
        nonlocal upload_calls
        with lock:
            upload_calls += 1
        response = client.post("/synthesize", data={"text": ONE_SENTENCE, "language": "en"},
                               files={"speaker_audio": ("speaker.wav", next(uploads), "audio/wav")})
        response.raise_for_status()
        return response.content

    def by_preset() -> bytes:
        body = {"text": ONE_SENTENCE, "voice": preset, "seed": next(seeds), "sample_rate": LEGACY_RATE, **no_cache}
        response = client.post("/v1/synthesize", json=body)
        response.raise_for_status()
        return response.content

    def conditioning() -> Any:
        # What an upload call adds: preprocessing (decode, resample, trim, normalise) + latents.
        reference = prepare_reference([("speaker.wav", next(uploads))], engine.reference_sample_rate)
        return engine.compute_latents(reference.samples)

    try:
        samples = interleave({"upload": upload, "preset": by_preset, "conditioning": conditioning},
                             1 if ctx.quick else 6, Budget(30 if ctx.quick else 150), warmup=0 if ctx.quick else 1,
                             min_rounds=1)
    finally:
        client.close()
    conditioned = server.metric("tts_conditioning_computations_total", {"engine": "xtts"}) - conditioned_before
    figure = ratio_figure("legacy upload (new audio) / preset, HTTP", samples, "upload", "preset",
                          upload_calls=upload_calls, upload_cache_misses=int(conditioned))
    result.figures.append(figure)
    if conditioned != upload_calls:
        result.notes.append(f"only {conditioned:.0f} of {upload_calls} uploads were conditioned (cache hits?)")
    share_by_difference = [(u - p) / u for u, p in zip(samples["upload"], samples["preset"], strict=False)]
    result.figures.append(paired(
        "conditioning share of an upload call", samples["conditioning"], samples["upload"],
        {"conditioning (in-process)": median(samples["conditioning"]), "upload": median(samples["upload"])},
        unit="", share_by_difference_median=median(share_by_difference),
        method="per round: (prepare_reference + compute_latents, in-process, same threads) / upload call",
    ))
