"""Kokoro-82M over real HTTP: real-time factor (whole response) and time to first audio (streamed)
of a 5-sentence Japanese text, on a gateway running only the kokoro engine."""

from __future__ import annotations

import itertools
import time

from benchmarks.common import CACHE_DIR, Budget, Context, Result, Server, Skip, median, paired, running, wav_seconds

WAV_HEADER = 44
VOICE = "kokoro:jf_alpha"
# Five sentences of a folk tale (Momotarō), about 20 s of speech.
JAPANESE_5 = ("むかしむかし、あるところに、おじいさんとおばあさんが住んでいました。"
              "おじいさんは山へしばかりに、おばあさんは川へせんたくに行きました。"
              "おばあさんが川でせんたくをしていると、大きな桃が流れてきました。"
              "おばあさんはその桃を家に持って帰りました。"
              "桃を切ってみると、中から元気な男の子が生まれました。")


def _check_available() -> None:
    from tts_gateway.engines.kokoro_engine import KokoroEngine
    from tts_gateway.engines.kokoro_models import find_source

    engine = KokoroEngine(find_source({"kokoro_model": None, "kokoro_voices": None}, CACHE_DIR / "kokoro"))
    ok, reason = engine.availability()
    if not ok:
        raise Skip(f"kokoro is unavailable: {reason}")


def in_process(ctx: Context, result: Result, rounds: int) -> None:
    """The engine alone, one onnxruntime thread in this thread: its CPU seconds per second of audio
    hardly move when other processes load the machine (wall-clock time does)."""
    import threading

    import numpy as np

    from tts_gateway.engines.base import EngineContext, SynthesisOptions, VoiceInput
    from tts_gateway.engines.kokoro_engine import KokoroEngine
    from tts_gateway.engines.kokoro_models import find_source
    from tts_gateway.text import split_sentences

    context = EngineContext(data_dir=ctx.workdir, threads=1)
    engine = KokoroEngine(find_source({}, CACHE_DIR / "kokoro"), threads=context.threads)
    engine.load()
    try:
        pieces = split_sentences(JAPANESE_5, "ja", engine.max_chars("ja"))
        wall: list[float] = []
        cpu: list[float] = []
        audio: list[float] = []
        for index in range(rounds + 1):
            started, cpu_started = time.perf_counter(), time.thread_time()
            samples = sum(chunk.size for piece in pieces for chunk in engine.synthesize(
                piece, VoiceInput(builtin="jf_alpha"), SynthesisOptions(language="ja", cancel=threading.Event())))
            if index == 0:
                continue  # warm-up
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - cpu_started)
            audio.append(samples / engine.sample_rate)
        result.figures.append(paired(
            "kokoro: CPU seconds per audio second (in process, 1 thread, 5 ja sentences)", cpu, audio,
            {"cpu": median(cpu), "wall": median(wall), "audio": median(audio)}, target=("<=", 1.0),
            pieces=len(pieces), wall_rtf=float(np.median(np.asarray(wall) / np.asarray(audio))),
        ))
    finally:
        engine.unload()


def run(ctx: Context, result: Result) -> None:
    import httpx

    _check_available()
    ctx.log("kokoro in process (1 thread)")
    in_process(ctx, result, 1 if ctx.quick else 3)
    env = {"TTS_GATEWAY_ENGINES": "kokoro", "TTS_GATEWAY_DEFAULT_VOICE": VOICE,
           # the reassembled model (92 MB) is kept between runs in the git-ignored bench cache
           "KOKORO_JA_CACHE": str(CACHE_DIR / "kokoro")}
    if ctx.threads:
        env["TTS_GATEWAY_ENGINE_THREADS"] = str(ctx.threads)
    rounds = 2 if ctx.quick else 6
    budget = Budget(90 if ctx.quick else 300)
    seeds = itertools.count(1)
    measured: dict[str, list[float]] = {"whole": [], "audio": [], "ttfa": [], "stream_full": []}

    with running(Server("kokoro", ctx.workdir, env)) as server:
        client = httpx.Client(base_url=server.base, timeout=httpx.Timeout(900, connect=10))
        try:
            def whole() -> None:
                body = {"text": JAPANESE_5, "voice": VOICE, "seed": next(seeds), "cache": False}
                started = time.perf_counter()
                response = client.post("/v1/synthesize", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"kokoro: {response.status_code} {response.text[:300]}")
                measured["whole"].append(elapsed)
                measured["audio"].append(wav_seconds(response.content))

            def streamed() -> None:
                body = {"text": JAPANESE_5, "voice": VOICE, "seed": next(seeds), "cache": False, "stream": True}
                started = time.perf_counter()
                first = None
                received = 0
                with client.stream("POST", "/v1/synthesize", json=body) as response:
                    if response.status_code != 200:
                        response.read()
                        raise RuntimeError(f"kokoro: {response.status_code} {response.text[:300]}")
                    for chunk in response.iter_raw():
                        received += len(chunk)
                        if first is None and received > WAV_HEADER:
                            first = time.perf_counter() - started
                if first is None:
                    raise RuntimeError("kokoro: the stream held no audio")
                measured["ttfa"].append(first)
                measured["stream_full"].append(time.perf_counter() - started)

            ctx.log("warming up kokoro (model reassembly on the first run, session load)")
            whole()
            for key in measured:
                measured[key].clear()
            for index in range(rounds):
                ctx.log(f"kokoro: 5 Japanese sentences, whole and streamed (round {index + 1}/{rounds})")
                for side in ((whole, streamed) if index % 2 == 0 else (streamed, whole)):
                    side()
                if index + 1 >= 2 and budget.spent():
                    break
        finally:
            client.close()

    audio_s = median(measured["audio"])
    result.figures.append(paired(
        "kokoro: real-time factor (5 ja sentences, whole response)", measured["whole"], measured["audio"],
        {"synthesis": median(measured["whole"]), "audio": audio_s}, unit="×", target=("<=", 1.0),
        threads=ctx.threads, samples={k: [round(v, 4) for v in vals] for k, vals in measured.items()},
    ))
    result.figures.append(paired(
        "kokoro: time to first audio / full time (5 ja sentences, stream)", measured["ttfa"], measured["stream_full"],
        {"first audio": median(measured["ttfa"]), "full": median(measured["stream_full"])}, target=("<=", 0.35),
        threads=ctx.threads, audio_seconds=audio_s,
    ))
