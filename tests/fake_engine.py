"""A controllable fake engine plugin for gateway-only behaviour (admission, faults, timeouts)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tts_gateway.engines.base import (
    BaseEngine,
    BuiltinVoice,
    Capabilities,
    ModelInfo,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl

RATE = 16000


class FakeEngine(BaseEngine):
    name = "fake"
    capabilities = Capabilities(streaming=True, deterministic=True)

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.load_delay = 0.0
        self.chunk_delay = 0.0
        self.chunks_per_piece = 2
        self.fail_after: int | None = None  # raise after this many chunks
        self.fail_once = False
        # When an Event: every chunk waits until it is set (or the request is cancelled). A test holds a
        # synthesis in place with it instead of hoping a delay is long enough.
        self.gate: threading.Event | None = None
        self.threads: list[str] = []
        self.started = threading.Event()
        self.finished_chunks = 0
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    @property
    def sample_rate(self) -> int:
        return RATE

    @property
    def languages(self) -> list[str]:
        return ["en", "de"]

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="fake/1", sha256="0" * 64, licence="CC0-1.0")

    def voices(self) -> list[BuiltinVoice]:
        return [BuiltinVoice("one", "en", "fake voice")]

    def load(self) -> None:
        time.sleep(self.load_delay)
        self.loads += 1
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.check_language(options.language)
        self.threads.append(threading.current_thread().name)
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.set()
        try:
            for index in range(self.chunks_per_piece):
                if self.fail_after is not None and index >= self.fail_after:
                    if self.fail_once:
                        self.fail_after = None
                    raise RuntimeError("fake engine crashed mid-synthesis")
                gate = self.gate
                if gate is not None:
                    while not gate.wait(0.005):
                        if options.cancel.is_set():
                            return
                if self.chunk_delay:
                    deadline = time.monotonic() + self.chunk_delay
                    while time.monotonic() < deadline:
                        if options.cancel.is_set():
                            return
                        time.sleep(0.005)
                self.finished_chunks += 1
                t = np.arange(RATE // 10) / RATE
                yield (0.3 * np.sin(2 * np.pi * (200 + len(text)) * t)).astype(np.float32)
        finally:
            with self._count_lock:
                self.active -= 1


class FakePlugin:
    """Registers one engine object (a fake, or any engine): ``running_app(settings, FakePlugin(engine))``."""

    def __init__(self, engine: BaseEngine) -> None:
        self.engine = engine

    @hookimpl
    def register_engines(self, register: Callable[[Any], None]) -> None:
        register(self.engine)
