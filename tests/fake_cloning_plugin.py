"""A cheap cloning engine plugin, loadable by name (TTS_GATEWAY_PLUGINS=tests.fake_cloning_plugin).

Used where a subprocess server needs a cloning engine but the test is about the gateway and
the registry (crash safety, draining), not about XTTS. It speaks one 0.2 s chunk per word of text.

Knobs (environment of the server process):

* FAKE_CHUNK_DELAY / FAKE_LATENT_DELAY (seconds): slow each chunk / each latent computation down.
  A delay only sets a *minimum* duration (a kill scheduled inside it lands mid-request); it never
  guarantees an ordering between processes — use the two below for that.
* FAKE_GATE_DIR: a word ``wait-for-<token>`` in the text holds the synthesis at that word until the
  file ``<FAKE_GATE_DIR>/<token>`` exists (or the request is cancelled), so a test decides when it
  goes on: "the first chunk left while the synthesis was still running" holds by construction.
* FAKE_LATENT_BARRIER_DIR: while ``<dir>/parties`` holds a number n, every latent computation (in
  any process) waits until n of them have started; racing registrations are then all past their
  early name checks before any of them can commit.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.engines.base import BaseEngine, Capabilities, ModelInfo, SynthesisOptions, VoiceInput
from tts_gateway.engines.hookspecs import hookimpl

RATE = 16000
GATE_PREFIX = "wait-for-"
BARRIER_GIVE_UP_S = 120.0  # a hang guard only: the other parties normally arrive within milliseconds


def _wait_for_gate(word: str, options: SynthesisOptions) -> bool:
    """Hold at a ``wait-for-<token>`` word until its gate file exists; False if cancelled meanwhile."""
    directory = os.environ.get("FAKE_GATE_DIR")
    if not directory or not word.startswith(GATE_PREFIX):
        return True
    gate = Path(directory) / word.removeprefix(GATE_PREFIX)
    while not gate.exists():
        if options.cancel.is_set():
            return False
        time.sleep(0.005)
    return True


def _latent_barrier() -> None:
    directory = os.environ.get("FAKE_LATENT_BARRIER_DIR")
    if not directory:
        return
    root = Path(directory)
    try:
        parties = int((root / "parties").read_text())
    except (FileNotFoundError, ValueError):
        return  # not armed
    (root / f"arrived-{os.getpid()}-{uuid.uuid4().hex}").touch()
    give_up = time.monotonic() + BARRIER_GIVE_UP_S
    while len(list(root.glob("arrived-*"))) < parties:
        if time.monotonic() > give_up:
            raise RuntimeError(f"latent barrier: fewer than {parties} computations arrived")
        time.sleep(0.005)


class FakeCloningEngine(BaseEngine):
    name = "clone"
    capabilities = Capabilities(streaming=True, deterministic=True)
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
        _latent_barrier()
        time.sleep(float(os.environ.get("FAKE_LATENT_DELAY", "0")))
        frames = audio[: audio.size // 256 * 256].reshape(-1, 256)
        return {"spectrum": np.abs(np.fft.rfft(frames, axis=1)).mean(axis=0).astype(np.float32)}

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.check_language(options.language)
        assert voice.latents is not None
        pitch = 100.0 + float(np.argmax(voice.latents["spectrum"]))
        delay = float(os.environ.get("FAKE_CHUNK_DELAY", "0"))
        t = np.arange(RATE // 5) / RATE
        for word in text.split():
            if options.cancel.is_set() or not _wait_for_gate(word, options):
                return
            time.sleep(delay)
            yield (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    register(FakeCloningEngine())
