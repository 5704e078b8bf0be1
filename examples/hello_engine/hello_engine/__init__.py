"""A minimal tts-gateway engine plugin: speaks every character as a short tone.

Install it (``pip install examples/hello_engine``) and the gateway finds it through the
``tts_gateway`` entry-point group; or name the module in ``TTS_GATEWAY_PLUGINS=hello_engine``.
It needs nothing from tts-gateway at import time: pluggy matches the hook by name and marker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy

hookimpl = pluggy.HookimplMarker("tts_gateway")

RATE = 16000
TONE_SECONDS = 0.08


@dataclass(frozen=True)
class _Capabilities:
    cloning: bool = False
    streaming: bool = True
    deterministic: bool = True
    native_speed: bool = False


@dataclass(frozen=True)
class _Voice:
    id: str
    language: str
    description: str
    licence: str = "CC0-1.0"


@dataclass(frozen=True)
class _Model:
    id: str = "hello/tones"
    sha256: str | None = None
    licence: str = "CC0-1.0"


class HelloEngine:
    """Implements the gateway's SpeechEngine protocol with plain attributes."""

    name = "hello"
    capabilities = _Capabilities()
    sample_rate = RATE
    languages = ("en",)
    model = _Model()

    def __init__(self) -> None:
        self.loaded = False

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def voices(self) -> list[_Voice]:
        return [_Voice("tone", "en", "A sine tone per character")]

    def max_chars(self, language: str) -> int:
        return 200

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def synthesize(self, text: str, voice: Any, options: Any) -> Iterator[np.ndarray]:
        t = np.arange(int(RATE * TONE_SECONDS)) / RATE
        for char in text:
            if options.cancel.is_set():
                return
            if char.isspace():
                yield np.zeros_like(t, dtype=np.float32)
                continue
            frequency = 220.0 + 10.0 * (ord(char) % 64)
            yield (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@hookimpl
def register_engines(register: Callable[[Any], None]) -> None:
    register(HelloEngine())
