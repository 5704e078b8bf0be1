"""The engine protocol: narrow, synchronous objects the gateway runs in worker threads.

An engine knows nothing of HTTP. It loads its model in ``load()`` (heavy imports happen there),
reports its languages, sample rate and capabilities, and turns one piece of text into float32
mono chunks. Cloning engines also turn reference audio into ``Latents``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tts_gateway.engines.timing import SENTENCE, WORD, TimedChunk
from tts_gateway.errors import Cancelled, Invalid, Unavailable

# Named float32 arrays, e.g. XTTS's gpt_cond_latent and speaker_embedding.
Latents = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Capabilities:
    """What an engine declares about how it runs. Whether it clones is not a flag: an engine clones when
    it implements `CloningEngine` (``/v1/engines`` reports that as ``capabilities.cloning``)."""

    streaming: bool = False
    # True when the same text, voice and options always give the same samples (no seed needed).
    deterministic: bool = False
    native_speed: bool = False
    # Several sentences of one request may run at once (the engine shares the cores itself).
    parallel_pieces: bool = False
    # IPA phonemes written inline as ``[[ … ]]`` are spoken as such (lexicon IPA entries, SSML <phoneme>).
    phonemes: bool = False


@dataclass(frozen=True)
class ModelInfo:
    id: str
    sha256: str | None = None
    licence: str = "unknown"


@dataclass(frozen=True)
class BuiltinVoice:
    """A read-only voice an engine ships, exposed as ``<engine>:<id>``."""

    id: str
    language: str  # its own language, the default when a request names none
    description: str = ""
    licence: str = "unknown"
    languages: tuple[str, ...] = ()  # every language it speaks, when more than its own (XTTS studio speakers)


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
    # Other work runs at the same time (this request's other sentences, or other requests): an engine
    # that shares the cores should give this call a single core, as it does the others.
    side_by_side: bool = False
    # The request's admission slot, lent to another request while this call only waits on work that
    # another thread does for many calls at once (a batching engine's shared step). None: no slot to lend.
    lend: Callable[[], AbstractContextManager[None]] | None = None


class EngineUnavailable(Unavailable):
    """The engine cannot load or run (missing model, missing system package, failed load)."""

    def __init__(self, engine: str, reason: str, *, retry_after: int | None = 30) -> None:
        super().__init__(f"engine {engine!r} is unavailable: {reason}", code="engine-unavailable",
                         title="Engine unavailable", retry_after=retry_after)
        self.engine = engine
        self.reason = reason


class UnsupportedLanguage(Invalid):
    def __init__(self, engine: str, language: str, available: list[str]) -> None:
        shown = ", ".join(available[:40]) + (" …" if len(available) > 40 else "")
        super().__init__(f"engine {engine!r} does not speak {language!r}; it has: {shown}",
                         code="unsupported-language", title="Unsupported language", field="language",
                         extra={"languages": available})
        self.engine = engine
        self.language = language
        self.available = available


class SynthesisCancelled(Cancelled):
    """The request went away or timed out; the engine stopped early."""


@runtime_checkable
class SpeechEngine(Protocol):
    """Every engine: text in, float32 mono chunks out."""

    name: str
    capabilities: Capabilities

    @property
    def sample_rate(self) -> int: ...

    @property
    def languages(self) -> Sequence[str]: ...

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


@runtime_checkable
class TimingEngine(Protocol):
    """An engine that knows when each word is heard, from its own durations or events (not estimates).

    Sentence timings need nothing from an engine (the gateway times each sentence it hands over);
    an engine that implements this gives word timings too. Only this method is checked, so asking
    runs none of an engine's properties.
    """

    def synthesize_timed(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[TimedChunk]:
        """Like ``synthesize``, each chunk with the words of ``text`` heard in it (`timing.input_words`),
        every word once and in order."""
        ...


@runtime_checkable
class BatchingEngine(Protocol):
    """An engine that decodes several requests together, one step at a time; it reports each step's size.
    Up to ``max_batch`` of its calls may lend their admission slot (`SynthesisOptions.lend`) at once."""

    max_batch: int

    def observe_batches(self, observer: Callable[[int], None]) -> None:
        """Call ``observer(n)`` after every decoding step that carried ``n`` sequences."""
        ...


@runtime_checkable
class RetryHinting(Protocol):
    """An engine that knows when being unavailable may end (a download's backoff, a hub checked again)."""

    def retry_after(self) -> int | None:
        """Seconds until asking again makes sense, as the last ``availability()`` said; None: no estimate."""
        ...


@dataclass(frozen=True)
class EngineContext:
    """What a plugin gets to build its engines: never the whole settings, never secrets.

    Attributes:
        data_dir: A directory the engine may use for its own files (``<data dir>/engines/<plugin>``
            is a good choice); the gateway does not create it.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (torch engines).
        threads: Intra-op threads to pin (0: the library's default).
        concurrency: How many syntheses the gateway may run at once.
        options: The built-in engines' settings, e.g. ``xtts_checkpoint``.
        engine_options: Every ``TTS_GATEWAY_ENGINE_<NAME>_<KEY>`` variable, by ``<NAME>_<KEY>``; an engine
            reads its own with `options_for`.
    """

    data_dir: Path
    device: str = "auto"
    threads: int = 0
    concurrency: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    engine_options: Mapping[str, str] = field(default_factory=dict)

    def options_for(self, engine: str) -> dict[str, str]:
        """The options of the engine named ``engine``: ``TTS_GATEWAY_ENGINE_HELLO_GREETING=hi`` gives
        ``options_for("hello") == {"greeting": "hi"}`` (a ``-`` in the name is ``_`` in the variable)."""
        return options_of(engine, self.engine_options)


def option_prefix(engine: str) -> str:
    """How the engine named ``engine`` begins its options' names: ``HELLO_`` for ``hello``."""
    return engine.upper().replace("-", "_") + "_"


def options_of(engine: str, engine_options: Mapping[str, str]) -> dict[str, str]:
    """The ``<NAME>_<KEY>`` entries of ``engine_options`` whose NAME is ``engine``, by lower-case KEY."""
    prefix = option_prefix(engine)
    return {name.removeprefix(prefix).lower(): value for name, value in engine_options.items()
            if name.startswith(prefix) and name != prefix}


@runtime_checkable
class BlendingEngine(SpeechEngine, Protocol):
    """An engine whose voices can be mixed: a preset made of weighted built-in voices."""

    def blend_latents(self, weights: dict[str, float]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class VoiceHintingEngine(SpeechEngine, Protocol):
    """An engine that can say why one of its voices is missing (e.g. it comes with other model files)."""

    def missing_voice_hint(self, voice_id: str) -> str | None:
        """What to do to get ``voice_id``, or None when the engine knows nothing of it."""
        ...


@runtime_checkable
class LanguageNamingEngine(Protocol):
    """An engine that knows its languages' names (``/v1/languages`` shows them; others get the standard ones)."""

    @property
    def language_names(self) -> Mapping[str, str]:
        """Language code → name, for some or all of ``languages``."""
        ...


@runtime_checkable
class ReplicatedEngine(Protocol):
    """An engine whose model lives in other processes (Ray Serve replicas), which load, unload and reap it.

    The gateway leaves such an engine alone when it closes and in the idle reaper, sends load/unload to
    every replica, and lists the replicas in ``/v1/engines``.
    """

    remote: bool

    def replicas(self) -> list[dict[str, Any]]:
        """Each live replica's state, as plain values."""
        ...


class BaseEngine:
    """Sensible defaults for the engine protocol: subclass it and write ``synthesize``.

    Set ``name``, ``sample_rate`` and ``languages`` (class attributes are enough), list built-in
    voices in ``voices()``; override ``load``/``unload`` when there is a model to hold.
    """

    name: str = "base"
    capabilities: Capabilities = Capabilities()

    if TYPE_CHECKING:
        # What a subclass must define. Declared for type checkers only: at run time a subclass that forgets
        # one lacks it, and registration names it (`missing_members`).
        @property
        def sample_rate(self) -> int: ...

        @property
        def languages(self) -> Sequence[str]: ...

        def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]: ...

    def __init__(self) -> None:
        self._loaded = False

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id=self.name)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def availability(self) -> tuple[bool, str | None]:
        return True, None

    def voices(self) -> list[BuiltinVoice]:
        return []

    def max_chars(self, language: str) -> int:
        return 400

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def check_language(self, language: str) -> None:
        languages = list(self.languages)
        if language not in languages:
            raise UnsupportedLanguage(self.name, language, languages)


def timestamp_levels(engine: SpeechEngine) -> tuple[str, ...]:
    """The timestamp levels ``engine`` gives: sentences always, words when it is a `TimingEngine`. A
    stand-in for an engine that runs elsewhere (Ray) says what that engine gives (``timestamp_levels``)."""
    relayed = getattr(engine, "timestamp_levels", None)
    if relayed is not None:
        return tuple(relayed)
    return (WORD, SENTENCE) if isinstance(engine, TimingEngine) else (SENTENCE,)


def protocol_members(protocol: type) -> list[str]:
    """The public attributes and methods ``protocol`` (a `typing.Protocol`) declares, its bases' too."""
    names: dict[str, None] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        for name in (*getattr(cls, "__annotations__", {}), *vars(cls)):
            if not name.startswith("_"):
                names[name] = None
    return list(names)


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, found without running its properties."""
    dynamic = hasattr(type(obj), "__getattr__")  # a proxy: its members exist only when asked for
    missing = []
    for name in protocol_members(protocol):
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            if not (dynamic and hasattr(obj, name)):
                missing.append(name)
    return missing


def match_language(engine: SpeechEngine, language: str) -> str:
    """The engine's code for ``language``: exact, then its base (``en-us`` → ``en``), then a unique
    regional variant (``pt`` → ``pt-br``). Raises `UnsupportedLanguage`."""
    wanted = language.strip().lower().replace("_", "-")
    available = list(engine.languages)
    if wanted in available:
        return wanted
    base = wanted.split("-")[0]
    if base in available:
        return base
    same_base = [code for code in available if code.split("-")[0] == base]
    if len(same_base) == 1:
        return same_base[0]
    raise UnsupportedLanguage(engine.name, language[:40], available)
