"""How int8 compares with fp32 on XTTS v2, measured on the user's machine and model.

The random weights this project is tested with say nothing about what int8 does to a real voice, so
``tts-gateway dev compare-precision`` lets anyone with the real model decide with evidence: for a few
seeded sentences, the share of identical audio tokens, the largest difference of the first step's logits,
how alike the two outputs sound to XTTS's own speaker encoder (cosine similarity), and the time of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tts_gateway.engines.base import VoiceInput
from tts_gateway.engines.xtts_engine import XttsEngine

SENTENCES = (("The birch canoe slid on the smooth planks.", "en"),
             ("Glue the sheet to the dark blue background.", "en"),
             ("Der Hund lief schnell über die grüne Wiese.", "de"),
             ("Il fait beau aujourd'hui, allons nous promener.", "fr"))


def compare_precision(checkpoint: Path | None, *, sentences: Sequence[tuple[str, str]] = SENTENCES,
                      seed: int = 1, device: str = "cpu", accept_licence: bool = False) -> dict[str, Any]:
    """Run ``sentences`` through an fp32 and an int8 engine on ``checkpoint`` (None: XTTS v2 from the Hugging
    Face cache); one row per sentence and the totals."""
    import numpy as np

    traces: dict[str, list[dict[str, Any]]] = {}
    engines = {}
    for precision in ("fp32", "int8"):
        engine = XttsEngine(checkpoint, device=device, precision=precision, accept_licence=accept_licence)
        engine.load()
        engines[precision] = engine
        speaker = engine.voices()[0].id
        voice = VoiceInput(builtin=speaker)
        engine.trace(sentences[0][0], sentences[0][1], voice, seed)  # warm-up
        traces[precision] = [engine.trace(text, language, voice, seed) for text, language in sentences]
    fp32 = engines["fp32"]
    rows = []
    try:
        for (text, language), a, b in zip(sentences, traces["fp32"], traces["int8"], strict=True):
            same = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=False))
            ea, eb = fp32.speaker_embedding(a["audio"]), fp32.speaker_embedding(b["audio"])
            rows.append({
                "text": text, "language": language, "tokens": [len(a["tokens"]), len(b["tokens"])],
                "identical_token_share": round(same / max(len(a["tokens"]), len(b["tokens"]), 1), 3),
                "first_logits_max_abs_diff": round(float(np.abs(a["logits"] - b["logits"]).max()), 4),
                "speaker_similarity": round(float(np.dot(ea, eb) / (np.linalg.norm(ea) * np.linalg.norm(eb))), 4),
                "seconds": [round(a["seconds"], 2), round(b["seconds"], 2)],
            })
    finally:
        for engine in engines.values():
            engine.unload()
    seconds = [sum(r["seconds"][i] for r in rows) for i in (0, 1)]
    return {"checkpoint": str(checkpoint) if checkpoint else "XTTS v2 (Hugging Face cache)", "seed": seed,
            "kernels": {"fp32": fp32.kernels, "int8": engines["int8"].kernels}, "sentences": rows,
            "identical_token_share": round(sum(r["identical_token_share"] for r in rows) / len(rows), 3),
            "speaker_similarity_min": min(r["speaker_similarity"] for r in rows),
            "seconds": {"fp32": round(seconds[0], 2), "int8": round(seconds[1], 2)},
            "int8_speed_up": round(seconds[0] / seconds[1], 2) if seconds[1] else None}


__all__ = ["SENTENCES", "compare_precision"]
