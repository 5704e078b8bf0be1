"""A cheap cloning engine plugin, loadable by name (TTS_GATEWAY_PLUGINS=tests.fake_cloning_plugin).

Used where a subprocess server needs a cloning engine but the test is about the gateway and
the registry (crash safety, draining), not about XTTS. FAKE_CHUNK_DELAY / FAKE_LATENT_DELAY
(seconds) slow it down to widen race windows.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from engines.base import BaseEngine, Capabilities, ModelInfo, SynthesisOptions, VoiceInput
from engines.hookspecs import hookimpl

RATE = 16000


class FakeCloningEngine(BaseEngine):
    name = "clone"
    capabilities = Capabilities(cloning=True, streaming=True, deterministic=True)
    reference_sample_rate = RATE

    @property
    def sample_rate(self) -> int:
        return RATE

    @property
    def languages(self) -> list[str]:
        return ["en"]

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="clone/1", sha256=hashlib.sha256(b"clone-model").hexdigest(), licence="CC0-1.0")

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(float(os.environ.get("FAKE_LATENT_DELAY", "0")))
        frames = audio[: audio.size // 256 * 256].reshape(-1, 256)
        return {"spectrum": np.abs(np.fft.rfft(frames, axis=1)).mean(axis=0).astype(np.float32)}

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.check_language(options.language)
        assert voice.latents is not None
        pitch = 100.0 + float(np.argmax(voice.latents["spectrum"]))
        delay = float(os.environ.get("FAKE_CHUNK_DELAY", "0"))
        t = np.arange(RATE // 5) / RATE
        for _ in text.split():
            if options.cancel.is_set():
                return
            time.sleep(delay)
            yield (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    register(FakeCloningEngine())
