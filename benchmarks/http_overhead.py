"""What the HTTP gateway costs over calling Piper in-process, and how throughput scales."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.common import Budget, Context, Figure, Result, interleave, median, ratio_figure, wav_bytes
from benchmarks.texts import ONE_SENTENCE, sentences

SEED = 1  # a seeded Piper request renders without sampling noise: the same work every time


def run(ctx: Context, result: Result) -> None:
    import httpx

    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.piper_engine import PiperEngine, _bundled_voices

    server = ctx.server()
    engine = PiperEngine(_bundled_voices(), threads=ctx.threads)
    engine.load()
    voice = VoiceInput(builtin="joe")

    def direct() -> bytes:
        options = SynthesisOptions(language="en", seed=SEED, repeatable=True)
        audio = np.concatenate(list(engine.synthesize(ONE_SENTENCE, voice, options)))
        return wav_bytes(audio, engine.sample_rate)

    no_cache = ctx.no_cache()
    client = httpx.Client(base_url=server.base, timeout=120)
    cache_headers: list[str] = []
    seeds = iter(range(SEED, 10**9))

    def http() -> bytes:
        # Piper's seeded output does not depend on the seed's value: fresh seeds change nothing
        # but the phrase-cache key.
        body = {"text": ONE_SENTENCE, "voice": "piper:joe", "seed": next(seeds), **no_cache}
        response = client.post("/v1/synthesize", json=body)
        response.raise_for_status()
        cache_headers.append(response.headers.get("x-cache", ""))
        return response.content

    hits: list[str] = []

    def cached() -> bytes:
        # The same request answered by the phrase cache: HTTP + framework + a cache read, no engine.
        response = client.post("/v1/synthesize", json={"text": ONE_SENTENCE, "voice": "piper:joe", "seed": 4242})
        response.raise_for_status()
        hits.append(response.headers.get("x-cache", ""))
        return response.content

    try:
        sides = {"http": http, "direct": direct}
        if cached() and cached() and hits[-1] == "hit":
            sides["cache hit"] = cached
        outputs: dict[str, bytes] = {}
        rounds = 4 if ctx.quick else 30
        samples = interleave(sides, rounds, Budget(30 if ctx.quick else 150), warmup=1 if ctx.quick else 2,
                             on_value=outputs.setdefault)
        same = outputs["http"] == outputs["direct"]
        result.figures.append(ratio_figure(
            "HTTP round trip / in-process Piper (1 sentence)", {k: samples[k] for k in ("http", "direct")}, "http",
            "direct", target=("<=", 1.05), identical_audio=same,
        ))
        if "cache hit" in samples:
            result.figures.append(ratio_figure(
                "same request served by the phrase cache / in-process Piper", samples, "cache hit", "direct",
                meaning="HTTP + framework + cache read, without synthesis: the floor of what HTTP adds",
                all_hits=all(h == "hit" for h in hits[1:]),
            ))
        if "hit" in cache_headers:
            result.notes.append(f"{cache_headers.count('hit')} HTTP requests were phrase-cache hits: invalid")
    finally:
        client.close()
        engine.unload()

    result.figures.append(throughput(ctx, server.base, no_cache))


def throughput(ctx: Context, base: str, no_cache: dict[str, Any]) -> Figure:
    """Requests/s with 1 and with 4 concurrent clients; rounds alternate, counts are bounded."""
    import httpx

    per_round = 4 if ctx.quick else 16
    rounds = 1 if ctx.quick else 3
    budget = Budget(40 if ctx.quick else 200)
    text = sentences(1)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def batch(clients: int) -> float:
        todo = list(range(per_round))
        with lock:
            seeds = [next(counter) for _ in todo]  # distinct seeds: no phrase cache can serve them

        def worker(my: list[int]) -> None:
            with httpx.Client(base_url=base, timeout=120) as client:
                for seed in my:
                    response = client.post("/v1/synthesize", json={"text": text, "voice": "piper:joe",
                                                                   "seed": 10**6 + seed, **no_cache})
                    response.raise_for_status()

        shares = [seeds[i::clients] for i in range(clients)]
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(worker, share) for share in shares]:
                future.result()
        return per_round / (time.perf_counter() - started)

    rates: dict[str, list[float]] = {"1 client": [], "4 clients": []}
    batch(1)  # warm-up
    for index in range(rounds):
        order = ["1 client", "4 clients"] if index % 2 == 0 else ["4 clients", "1 client"]
        for name in order:
            rates[name].append(batch(1 if name == "1 client" else 4))
        if budget.spent():
            break
    one, four = median(rates["1 client"]), median(rates["4 clients"])
    detail: dict[str, Any] = {"requests_per_batch": per_round, "rounds": len(rates["1 client"]),
                              "rates": {k: [round(v, 3) for v in vals] for k, vals in rates.items()}}
    return Figure("throughput 4 clients / 1 client (req/s)", four / one if one else None, "×",
                  medians={"1 client req/s": one, "4 clients req/s": four}, detail=detail)
