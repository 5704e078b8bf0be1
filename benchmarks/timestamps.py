"""What word timestamps cost: the same sentences with and without word timings, Piper and Kokoro, in
process (one thread, seeded so both sides render the same audio), the two sides interleaved."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.common import CACHE_DIR, Budget, Context, Result, Skip, ratio_figure
from benchmarks.kokoro_bench import JAPANESE_5
from benchmarks.texts import HARVARD


def _compare(result: Result, label: str, engine: Any, pieces: list[str], voice: str, language: str,
             rounds: int, budget: Budget) -> None:
    from tts_gateway.core.frontend import prepare
    from tts_gateway.core.word_map import build_word_map
    from tts_gateway.engines.base import SynthesisOptions, VoiceInput

    def run(make: Callable[..., Iterator[Any]]) -> float:
        started = time.perf_counter()
        timed = make == engine.synthesize_timed
        # The timed side also maps the spoken words back to the written ones, as the core does.
        reader = build_word_map(" ".join(pieces), pieces, lambda word: prepare(word, language).text).reader() \
            if timed else None
        for index, piece in enumerate(pieces):
            for chunk in make(piece, VoiceInput(builtin=voice),
                              SynthesisOptions(language=language, seed=1, repeatable=True, cancel=threading.Event())):
                if reader is not None:
                    reader.feed(chunk.words)
            if reader is not None:
                reader.end_piece(index)
        return time.perf_counter() - started

    run(engine.synthesize)
    run(engine.synthesize_timed)  # warm-up: sessions, phonemizers
    samples: dict[str, list[float]] = {"timed": [], "plain": []}
    for index in range(rounds):
        # Alternate which side goes first, so neither always runs on a warmer cache.
        order = ("timed", "plain") if index % 2 else ("plain", "timed")
        for side in order:
            samples[side].append(run(engine.synthesize_timed if side == "timed" else engine.synthesize))
        if index >= 2 and budget.spent():
            break
    result.figures.append(ratio_figure(f"word timestamps / none, {label} ({len(pieces)} sentences, in process)",
                                       samples, "timed", "plain", target=("<=", 1.05)))


def run(ctx: Context, result: Result) -> None:
    from tts_gateway.engines.kokoro_engine import KokoroEngine
    from tts_gateway.engines.kokoro_models import find_source
    from tts_gateway.engines.piper_engine import PiperEngine, _bundled_voices
    from tts_gateway.text import split_sentences

    rounds = 3 if ctx.quick else 10
    piper = PiperEngine(_bundled_voices(), threads=1, sessions=1)
    if not piper.availability()[0]:
        raise Skip(f"piper is unavailable: {piper.availability()[1]}")
    piper.load()
    try:
        ctx.log("word timestamps: piper")
        _compare(result, "Piper", piper, HARVARD[:5], "joe", "en", rounds, Budget(30 if ctx.quick else 120))
    finally:
        piper.unload()
    kokoro = KokoroEngine(find_source({}, CACHE_DIR / "kokoro"), threads=1)
    ok, reason = kokoro.availability()
    if not ok:
        result.notes.append(f"kokoro skipped: {reason}")
        return
    kokoro.load()
    try:
        ctx.log("word timestamps: kokoro")
        pieces = split_sentences(JAPANESE_5, "ja", kokoro.max_chars("ja"))
        _compare(result, "Kokoro", kokoro, pieces, "jf_alpha", "ja", max(2, rounds // 2),
                 Budget(30 if ctx.quick else 180))
    finally:
        kokoro.unload()
