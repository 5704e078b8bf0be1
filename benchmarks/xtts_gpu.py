"""``python -m benchmarks.xtts_gpu``: XTTS's batched GPT and a whole request on a CUDA GPU, real-size checkpoint.

One command, a few minutes: tokens per second of one batched GPT step at batch 1, 4, 8 and 16, and a lone
request's real-time factor (fp32). Without a CUDA device it reports a skip and exits 0. The checkpoint is
the random-weight XTTS v2 of real size that ``benchmarks/xtts_real_size.py`` builds (or
``tts-gateway dev tiny-xtts DIR --size v2``), so figures are real costs of noise.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / ".cache" / "bench" / "xtts-v2-size-30x1024"


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA device (torch.cuda.is_available() is False)"}))
        return 0
    if not (CHECKPOINT / "model.pth").is_file():
        from tts_gateway.engines.tiny_xtts import V2_MAX_AUDIO_TOKENS, V2_SIZE, build_tiny_xtts

        build_tiny_xtts(CHECKPOINT, max_audio_tokens=V2_MAX_AUDIO_TOKENS, **V2_SIZE)
    import numpy as np

    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.xtts_batching import probe_step
    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = XttsEngine(CHECKPOINT, device="cuda")
    engine.load()
    try:
        stack = engine._batcher.stack  # type: ignore[union-attr]
        tokens_per_s = {}
        for rows in (1, 4, 8, 16):
            probe_step(stack, rows)
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(10):
                probe_step(stack, rows)
            torch.cuda.synchronize()
            tokens_per_s[rows] = round(rows * 10 / (time.perf_counter() - started), 1)
        voice = VoiceInput(builtin=engine.voices()[0].id)
        text = "The birch canoe slid on the smooth planks."
        np.concatenate(list(engine.synthesize(text, voice, SynthesisOptions(language="en", seed=1))))
        started = time.perf_counter()
        audio = np.concatenate(list(engine.synthesize(text, voice, SynthesisOptions(language="en", seed=2))))
        rtf = (time.perf_counter() - started) / (audio.size / engine.sample_rate)
    finally:
        engine.unload()
    print(json.dumps({"status": "ok", "device": torch.cuda.get_device_name(0), "kernels": engine.kernels,
                      "tokens_per_s_by_batch": tokens_per_s, "lone_request_rtf": round(rtf, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
