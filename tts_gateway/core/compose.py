"""The composition root: one place that builds engines, registry, voices, metrics and the service.

Every entry point (the HTTP app, the CLI, a Ray replica, benchmarks, tests) calls `build_core`,
so the wiring exists once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tts_gateway.config import Settings
from tts_gateway.core.metrics import Metrics
from tts_gateway.core.phrase_cache import PhraseCache
from tts_gateway.core.service import SynthesisService
from tts_gateway.engines.base import BatchingEngine
from tts_gateway.engines.manager import EngineManager
from tts_gateway.voices import Lexicon, open_lexicon, open_registry
from tts_gateway.voices.catalog import VoiceCatalog
from tts_gateway.voices.registry import VoiceRegistry


@dataclass
class Core:
    """Everything below the edges, built once per process."""

    settings: Settings
    engines: EngineManager
    registry: VoiceRegistry
    voices: VoiceCatalog
    metrics: Metrics
    service: SynthesisService
    cache: PhraseCache | None = None
    lexicon: Lexicon | None = None

    def close(self) -> None:
        self.engines.close()
        self.registry.close()
        if self.lexicon is not None:
            self.lexicon.close()
        if self.cache is not None:
            self.cache.close()


def build_core(
    settings: Settings,
    *,
    engines: EngineManager | None = None,
    extra_plugins: Sequence[Any] = (),
    load_entry_points: bool = True,
    phrase_cache: bool = True,
    metrics: Metrics | None = None,
    engine_metrics: bool = True,
) -> Core:
    """Build the core for ``settings``.

    Args:
        settings: Read once at start.
        engines: An engine manager to use instead of building one (tests pass their own).
        extra_plugins: Plugin objects registered after the built-ins (tests use fake engines).
        load_entry_points: Also load plugins of the ``tts_gateway`` entry-point group.
        phrase_cache: Open the on-disk phrase cache (the HTTP app does; the CLI and replicas do not).
        metrics: A metrics registry to share; a fresh one by default.
        engine_metrics: Count conditioning and latents cache hits here; off when the engines run
            elsewhere (Ray replicas count their own).

    Raises:
        SettingsError / RegistryConnectError: a setting names an unknown engine or plugin, or the
            registry database cannot be reached.
    """
    metrics = metrics or Metrics()
    manager = engines or EngineManager(settings, extra_plugins=tuple(extra_plugins),
                                       load_entry_points=load_entry_points)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if engine_metrics:
        registry = open_registry(settings, on_conditioning=lambda engine: metrics.conditioning.labels(engine).inc(),
                                 on_cache_hit=lambda engine: metrics.voice_cache_hits.labels(engine).inc())
    else:  # the replicas count
        registry = open_registry(settings)
    if engine_metrics:
        for name in manager.names:
            engine = manager.get(name)
            if isinstance(engine, BatchingEngine):
                engine.observe_batches(metrics.batch_size.labels(name).observe)
    voices = VoiceCatalog(manager, registry, settings.default_voice, require_consent=settings.require_consent)
    cache = PhraseCache(settings.data_dir / "phrase-cache", settings.cache_bytes, metrics) if phrase_cache else None
    lexicon = open_lexicon(settings)
    return Core(settings=settings, engines=manager, registry=registry, voices=voices, metrics=metrics,
                service=SynthesisService(settings, manager, voices, metrics, lexicon), cache=cache, lexicon=lexicon)
