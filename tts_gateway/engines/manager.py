"""EngineManager: finds engines through pluggy and loads them lazily and thread-safely."""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from tts_gateway.config import Settings, SettingsError
from tts_gateway.config.settings import ENGINE_OPTION_PREFIX
from tts_gateway.engines import hookspecs
from tts_gateway.engines.base import (
    EngineContext,
    EngineUnavailable,
    ReplicatedEngine,
    RetryHinting,
    SpeechEngine,
    missing_members,
    option_prefix,
)
from tts_gateway.errors import NotFound

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tts_gateway"
# Built-in engines, each a plugin module; TTS_GATEWAY_ENGINES picks which of them load.
DEFAULT_PLUGINS: dict[str, str] = {
    "piper": "tts_gateway.engines.piper_engine",
    "xtts": "tts_gateway.engines.xtts_engine",
    "espeak": "tts_gateway.engines.espeak_engine",
    "kokoro": "tts_gateway.engines.kokoro_engine",
}


def engine_context(settings: Settings) -> EngineContext:
    """The narrow view of the settings that plugins get (no keys, no database URL)."""
    return EngineContext(
        data_dir=settings.data_dir / "engines",
        device=settings.device,
        threads=settings.engine_threads,
        concurrency=settings.max_concurrency,
        options={"xtts_checkpoint": settings.xtts_checkpoint, "accept_cpml": settings.accept_cpml,
                 "xtts_max_batch": settings.xtts_max_batch, "xtts_precision": settings.xtts_precision,
                 "kokoro_model": settings.kokoro_model, "kokoro_voices": settings.kokoro_voices,
                 "piper_voices_dir": settings.piper_voices_dir},
        engine_options=settings.engine_options,
    )


def unavailable(engine: SpeechEngine, reason: str | None) -> EngineUnavailable:
    """The 503 for an engine that said it is unavailable; Retry-After as the engine estimates it."""
    retry_after = engine.retry_after() if isinstance(engine, RetryHinting) else None
    return EngineUnavailable(engine.name, reason or "not available", retry_after=retry_after or 30)


class UnknownEngine(NotFound):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown engine {name!r}; known engines: {', '.join(known) or '(none)'}",
                         code="unknown-engine")
        self.name = name


@dataclass
class _Slot:
    engine: SpeechEngine
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    load_error: str | None = None


class EngineManager:
    """Registry of engines with lazy, once-only loading and idle unloading.

    Args:
        settings: Gateway settings; ``engines`` picks built-ins, ``plugins`` adds modules.
        extra_plugins: Plugin objects registered after the others (tests use this).
        load_entry_points: Also load the ``tts_gateway`` entry-point group.
    """

    def __init__(
        self,
        settings: Settings,
        extra_plugins: tuple[Any, ...] = (),
        *,
        load_entry_points: bool = True,
    ) -> None:
        self.settings = settings
        self.pm = pluggy.PluginManager("tts_gateway")
        self.pm.add_hookspecs(hookspecs)
        for name in settings.engines:
            if name not in DEFAULT_PLUGINS:
                raise SettingsError(
                    f"TTS_GATEWAY_ENGINES names unknown built-in engine {name!r}; "
                    f"built-ins are {', '.join(DEFAULT_PLUGINS)}"
                )
            self.pm.register(importlib.import_module(DEFAULT_PLUGINS[name]), name=f"builtin-{name}")
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for module_name in settings.plugins:
            try:
                module: ModuleType = importlib.import_module(module_name)
            except ImportError as exc:
                raise SettingsError(f"TTS_GATEWAY_PLUGINS: cannot import {module_name!r}: {exc}") from exc
            if not self.pm.is_registered(module):
                self.pm.register(module, name=module_name)
        for plugin in extra_plugins:
            self.pm.register(plugin)
        # A misspelt hookimpl (e.g. ``register_engine``) fails here, at start, not silently later.
        self.pm.check_pending()

        self._slots: dict[str, _Slot] = {}
        self.pm.hook.register_engines(register=self._register, context=engine_context(settings))
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    def _register(self, engine: SpeechEngine) -> None:
        missing = missing_members(engine, SpeechEngine)
        if missing:
            name = type(engine).__name__ if "name" in missing else engine.name
            raise TypeError(f"engine {name!r} lacks {', '.join(missing)}: an engine has every member of "
                            f"SpeechEngine (BaseEngine gives all but sample_rate, languages and synthesize)")
        if engine.name in self._slots:
            raise ValueError(f"two plugins register an engine named {engine.name!r}")
        self._slots[engine.name] = _Slot(engine)

    def unclaimed_options(self) -> list[str]:
        """``TTS_GATEWAY_ENGINE_<NAME>_<KEY>`` variables whose NAME is no registered engine (a typo, most likely)."""
        prefixes = [option_prefix(name) for name in self.names]
        return [f"{ENGINE_OPTION_PREFIX}{variable}" for variable in self.settings.engine_options
                if not any(variable.startswith(prefix) and variable != prefix for prefix in prefixes)]

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def get(self, name: str) -> SpeechEngine:
        """The engine object, loaded or not."""
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownEngine(name, self.names)
        return slot.engine

    def check_available(self, name: str) -> SpeechEngine:
        """The engine, if it can load; `EngineUnavailable` with the reason otherwise."""
        engine = self.get(name)
        ok, reason = engine.availability()
        if not ok:
            raise unavailable(engine, reason)
        return engine

    def plugin_names(self) -> list[str]:
        return sorted(n for n, _ in self.pm.list_name_plugin() if n)

    def load_seconds(self, name: str) -> float | None:
        return self._slots[name].load_seconds

    # -- lifecycle ------------------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownEngine(name, self.names)
        return slot

    def _load_locked(self, name: str, slot: _Slot) -> None:
        """Load under ``slot.lock``; a second caller waits on the lock and finds it loaded."""
        engine = slot.engine
        if engine.loaded:
            return
        ok, reason = engine.availability()
        if not ok:
            raise unavailable(engine, reason)
        started = time.perf_counter()
        try:
            engine.load()
        except EngineUnavailable:
            raise
        except Exception as exc:
            slot.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading engine %s failed", name)
            raise EngineUnavailable(name, f"failed to load: {slot.load_error}") from exc
        slot.load_error = None
        slot.load_seconds = time.perf_counter() - started
        slot.last_used = time.monotonic()
        log.info("engine %s loaded in %.2fs", name, slot.load_seconds)

    def ensure_loaded(self, name: str) -> SpeechEngine:
        """Load the engine once, even when many threads ask at the same moment."""
        slot = self._slot(name)
        if not slot.engine.loaded:
            with slot.lock:
                self._load_locked(name, slot)
        return slot.engine

    def unload(self, name: str, *, force: bool = False) -> bool:
        """Unload now; refuse (return False) while a synthesis uses it unless ``force``."""
        slot = self._slot(name)
        with slot.lock:
            if slot.in_use and not force:
                return False
            if slot.engine.loaded:
                slot.engine.unload()
                log.info("engine %s unloaded", name)
        return True

    @contextmanager
    def use(self, name: str) -> Iterator[SpeechEngine]:
        """Load if needed and pin the engine so the idle reaper leaves it alone meanwhile."""
        slot = self._slot(name)
        with slot.lock:
            self._load_locked(name, slot)
            slot.in_use += 1
        try:
            yield slot.engine
        finally:
            with slot.lock:
                slot.in_use -= 1
                slot.last_used = time.monotonic()

    def reap_idle(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Unload engines idle for longer than ``ttl_s``; returns their names."""
        now = time.monotonic() if now is None else now
        reaped = []
        for name, slot in self._slots.items():
            if isinstance(slot.engine, ReplicatedEngine):  # its model lives elsewhere, which reaps it
                continue
            with slot.lock:
                if slot.engine.loaded and not slot.in_use and now - slot.last_used > ttl_s:
                    slot.engine.unload()
                    reaped.append(name)
        for name in reaped:
            log.info("engine %s unloaded after %.0fs idle", name, ttl_s)
        return reaped

    def start_reaper(self) -> None:
        ttl = self.settings.engine_idle_ttl_s
        if ttl <= 0 or self._reaper is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(min(ttl / 4, 5.0)):
                self.reap_idle(ttl)

        self._reaper = threading.Thread(target=loop, name="engine-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
            self._reaper = None
        for name in self.names:
            if not isinstance(self.get(name), ReplicatedEngine):  # a remote model outlives this process
                self.unload(name, force=True)
