"""Synthesis time vs text length per engine (in-process, through SynthesisService): a line's slope is
the real-time factor (seconds of compute per second of audio)."""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.common import Budget, Context, Figure, Result, linear_fit, median, timed, wav_seconds
from benchmarks.texts import sentences

# Tiny XTTS always makes 48 audio tokens (~2 s) a sentence at ~3 s of compute on this box, so
# 100 sentences would take minutes and add nothing a shorter line does not show.
COUNTS: dict[str, dict[str, tuple[int, ...]]] = {
    "full": {"piper": (1, 10, 100), "espeak": (1, 10, 100), "xtts": (1, 5, 20)},
    "quick": {"piper": (1, 5, 10), "espeak": (1, 5, 10), "xtts": (1, 2)},
}
ROUNDS = {"full": {"piper": 2, "espeak": 3, "xtts": 1}, "quick": {"piper": 1, "espeak": 1, "xtts": 1}}


def run(ctx: Context, result: Result) -> None:
    inproc = ctx.inproc()
    mode = "quick" if ctx.quick else "full"
    voices = {"piper": "piper:joe", "espeak": "espeak:en", "xtts": ctx.inproc_preset()}
    budget = Budget(60 if ctx.quick else 420)
    for engine, voice in voices.items():
        ok, reason = inproc.engines.get(engine).availability()
        if not ok:
            result.notes.append(f"{engine} skipped: {reason}")
            continue
        counts = COUNTS[mode][engine]
        if ctx.quick and engine == "xtts":
            inproc.engines.ensure_loaded(engine)  # a tiny-XTTS warm-up costs seconds: not in a smoke run
        else:
            inproc.synthesize(sentences(1), voice=voice, seed=1)  # load + warm up
        times: dict[int, list[float]] = {n: [] for n in counts}
        audio: dict[int, float] = {}
        for index in range(ROUNDS[mode][engine]):
            order = counts if index % 2 == 0 else counts[::-1]
            for count in order:
                ctx.log(f"{engine}: {count} sentence(s), round {index + 1}")
                seconds, data = timed(functools.partial(inproc.synthesize, sentences(count), voice=voice, seed=1))
                times[count].append(seconds)
                audio[count] = wav_seconds(data)
            if budget.spent():
                break
        xs = [audio[n] for n in counts]
        ys = [median(times[n]) for n in counts]
        slope, intercept, r2 = linear_fit(xs, ys)
        medians: dict[str, float] = {f"{n} sent.": median(times[n]) for n in counts}
        medians["R²"] = r2
        detail: dict[str, Any] = {
            "sentences": list(counts), "audio_seconds": xs, "compute_seconds_median": ys, "intercept_s": intercept,
            "r2": r2, "rtf_longest": ys[-1] / xs[-1] if xs[-1] else None,
            "samples": {str(n): [round(v, 4) for v in times[n]] for n in counts},
        }
        result.figures.append(Figure(f"{engine}: real-time factor (slope of time vs audio s)", slope, "s/s",
                                     medians=medians, detail=detail))
