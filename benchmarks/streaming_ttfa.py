"""Time to first audio byte vs full time of a streamed 10-sentence request, over real HTTP."""

from __future__ import annotations

import itertools
import time

from benchmarks.common import Budget, Context, Result, median, paired
from benchmarks.texts import sentences

WAV_HEADER = 44


def run(ctx: Context, result: Result) -> None:
    import httpx

    server = ctx.server()
    preset = ctx.server_preset()
    no_cache = ctx.no_cache()
    # (engine, voice, sentences, rounds); tiny XTTS costs ~3–8 s a streamed sentence on 2 cores.
    plans = [("piper", "piper:joe", 10, 1 if ctx.quick else 5),
             ("xtts", preset, 1 if ctx.quick else 10, 1 if ctx.quick else 2)]
    seeds = itertools.count(1)
    budget = Budget(60 if ctx.quick else 360)
    client = httpx.Client(base_url=server.base, timeout=httpx.Timeout(900, connect=10))
    measured: dict[str, dict[str, list[float]]] = {e: {"ttfa": [], "full": [], "headers": []} for e, *_ in plans}
    audio_seconds: dict[str, float] = {}

    def once(engine: str, voice: str, count: int) -> None:
        body = {"text": sentences(count), "voice": voice, "stream": True, "seed": next(seeds), **no_cache}
        started = time.perf_counter()
        first_audio = None
        received = 0
        with client.stream("POST", "/v1/synthesize", json=body) as response:
            headers_at = time.perf_counter() - started
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"{engine}: {response.status_code} {response.text[:300]}")
            for chunk in response.iter_raw():
                received += len(chunk)
                if first_audio is None and received > WAV_HEADER:
                    first_audio = time.perf_counter() - started
        full = time.perf_counter() - started
        if first_audio is None:
            raise RuntimeError(f"{engine}: the stream held no audio")
        measured[engine]["ttfa"].append(first_audio)
        measured[engine]["full"].append(full)
        measured[engine]["headers"].append(headers_at)
        rate = int(response.headers.get("x-sample-rate", "0") or 0)
        audio_seconds[engine] = (received - WAV_HEADER) / 2 / rate if rate else 0.0

    try:
        for index in range(max(p[3] for p in plans)):
            order = plans if index % 2 == 0 else plans[::-1]
            for engine, voice, count, rounds in order:
                if index < rounds:
                    ctx.log(f"streaming {count} sentences with {engine} (round {index + 1}/{rounds})")
                    once(engine, voice, count)
            if budget.spent():
                break
    finally:
        client.close()

    for engine, _voice, count, _rounds in plans:
        data = measured[engine]
        label = f"{count} sentence{'s' if count > 1 else ''}"
        result.figures.append(paired(
            f"{engine}: time to first audio / full time ({label}, stream)", data["ttfa"], data["full"],
            {"first audio": median(data["ttfa"]), "full": median(data["full"])}, target=("<=", 0.15),
            sentences=count, audio_seconds=audio_seconds.get(engine), headers_median_s=median(data["headers"]),
            samples={k: [round(v, 4) for v in vals] for k, vals in data.items()},
        ))
