"""The engine protocol: narrow, synchronous objects the gateway runs in worker threads.

An engine knows nothing of HTTP. It loads its model in ``load()`` (heavy imports happen there),
reports its languages, sample rate and capabilities, and turns one piece of text into float32
mono chunks. Cloning engines also turn reference audio into ``Latents``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# Named float32 arrays, e.g. XTTS's gpt_cond_latent and speaker_embedding.
Latents = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Capabilities:
    cloning: bool = False
    streaming: bool = False
    # True when the same text, voice and options always give the same samples (no seed needed).
    deterministic: bool = False
    native_speed: bool = False


@dataclass(frozen=True)
class ModelInfo:
    id: str
    sha256: str | None = None
    licence: str = "unknown"


@dataclass(frozen=True)
class BuiltinVoice:
    """A read-only voice an engine ships, exposed as ``<engine>:<id>``."""

    id: str
    language: str
    description: str = ""
    licence: str = "unknown"


@dataclass(frozen=True)
class VoiceInput:
    """What to speak with: a built-in voice id, or cached latents for a cloning engine."""

    builtin: str | None = None
    latents: Latents | None = None


@dataclass
class SynthesisOptions:
    language: str
    speed: float = 1.0
    seed: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    # The client asked for this seed: the result must be repeatable, even on engines that
    # would otherwise sample noise they cannot seed.
    repeatable: bool = False
    # The caller sends audio as it comes: engines that decode in chunks should yield early;
    # otherwise they may decode once at the end (faster for XTTS).
    streaming: bool = False


class EngineError(Exception):
    """Base class for engine failures the gateway maps to HTTP problems."""


class EngineUnavailable(EngineError):
    def __init__(self, engine: str, reason: str) -> None:
        super().__init__(f"engine {engine!r} is unavailable: {reason}")
        self.engine = engine
        self.reason = reason


class UnsupportedLanguage(EngineError):
    def __init__(self, engine: str, language: str, available: list[str]) -> None:
        shown = ", ".join(available[:40]) + (" …" if len(available) > 40 else "")
        super().__init__(f"engine {engine!r} does not speak {language!r}; it has: {shown}")
        self.engine = engine
        self.language = language
        self.available = available


class SynthesisCancelled(EngineError):
    """The request went away or timed out; the engine stopped early."""


class InvalidReferenceAudio(EngineError):
    def __init__(self, detail: str, *, not_audio: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.not_audio = not_audio


@runtime_checkable
class SpeechEngine(Protocol):
    """Every engine: text in, float32 mono chunks out."""

    name: str
    capabilities: Capabilities

    @property
    def sample_rate(self) -> int: ...

    @property
    def languages(self) -> list[str]: ...

    @property
    def model(self) -> ModelInfo: ...

    @property
    def loaded(self) -> bool: ...

    def availability(self) -> tuple[bool, str | None]:
        """(True, None) when ``load()`` can work; else (False, why)."""
        ...

    def voices(self) -> list[BuiltinVoice]: ...

    def max_chars(self, language: str) -> int:
        """Longest piece of text ``synthesize`` takes in one call for this language."""
        ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at ``sample_rate`` for one sentence-sized piece of text."""
        ...


@runtime_checkable
class CloningEngine(SpeechEngine, Protocol):
    """An engine that speaks in a voice conditioned on reference audio."""

    # Rate the reference audio is handed over at (mono float32 in [-1, 1]).
    reference_sample_rate: int

    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]: ...


class BaseEngine:
    """Shared bookkeeping for built-in engines; plugins may use it or implement the protocol."""

    name = "base"
    capabilities = Capabilities()

    def __init__(self) -> None:
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def voices(self) -> list[BuiltinVoice]:
        return []

    def max_chars(self, language: str) -> int:
        return 400

    def check_language(self, language: str) -> None:
        if language not in self.languages:  # type: ignore[attr-defined]
            raise UnsupportedLanguage(self.name, language, list(self.languages))  # type: ignore[attr-defined]
