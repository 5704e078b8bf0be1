"""Prometheus metrics, one registry per app instance (no module-level globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# (source id, Prometheus text) pairs from other processes, e.g. Ray replicas
RemoteTexts = Callable[[], Iterable[tuple[str, str]]]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tts_requests", "Synthesis requests by engine and HTTP status",
                                ["engine", "status"], registry=r)
        self.synthesis_seconds = Histogram("tts_synthesis_seconds", "Wall time of one synthesis",
                                           ["engine"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttfa = Histogram("tts_time_to_first_audio_seconds", "Request start to first audio bytes",
                              ["engine"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("tts_real_time_factor", "Synthesis time divided by audio duration",
                             ["engine"], buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10), registry=r)
        self.audio_seconds = Counter("tts_audio_seconds", "Seconds of audio produced", ["engine"], registry=r)
        self.conditioning = Counter("tts_conditioning_computations",
                                    "Speaker latent computations (a synthesis by preset never adds one)",
                                    ["engine"], registry=r)
        self.voice_cache_hits = Counter("tts_voice_cache_hits", "Stored latents reused instead of recomputed",
                                        ["engine"], registry=r)
        self.batch_size = Histogram("tts_batch_size", "Sequences decoded together in one step of a batching engine",
                                    ["engine"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.queue_depth = Gauge("tts_queue_depth", "Syntheses waiting for a slot", registry=r)
        self.in_flight = Gauge("tts_in_flight", "Syntheses running", registry=r)
        self.engine_loaded = Gauge("tts_engine_loaded", "1 when the engine's model is in memory",
                                   ["engine"], registry=r)
        self.phrase_hits = Counter("tts_phrase_cache_hits", "Phrase cache hits", registry=r)
        self.phrase_misses = Counter("tts_phrase_cache_misses", "Phrase cache misses", registry=r)
        self.phrase_bytes = Gauge("tts_phrase_cache_bytes", "Bytes held by the phrase cache", registry=r)
        self._remote: list[tuple[RemoteTexts, frozenset[str], str]] = []

    def add_remote(self, texts: RemoteTexts, names: Iterable[str], label: str) -> None:
        """Also expose the families ``names`` that ``texts()`` returns, each sample labelled ``label=<source id>``
        (Ray replicas' engine metrics, under the same names as this process's own)."""
        self._remote.append((texts, frozenset(names), label))

    def render(self) -> bytes:
        if not self._remote:
            return generate_latest(self.registry)
        families: dict[str, Metric] = {family.name: family for family in self.registry.collect()}
        for texts, names, label in self._remote:
            for source, text in texts():
                for remote in text_string_to_metric_families(text):
                    if remote.name not in names:
                        continue
                    family = families.get(remote.name)
                    if family is None:
                        family = families[remote.name] = Metric(remote.name, remote.documentation, remote.type)
                    family.samples.extend(Sample(s.name, {**s.labels, label: source}, s.value, s.timestamp, s.exemplar)
                                          for s in remote.samples)
        return generate_latest(_Families(list(families.values())))


class _Families:
    """Ready-made metric families, in the shape `generate_latest` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
