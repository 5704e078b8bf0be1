"""Wyoming's own series, in the gateway's metrics registry beside the shared ones."""

from __future__ import annotations

import weakref
from typing import ClassVar

from prometheus_client import Counter, Gauge

from tts_gateway.core.metrics import Metrics


class WyomingMetrics:
    """Requests by engine and outcome, and open connections (one set per registry)."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[Metrics, WyomingMetrics]] = weakref.WeakKeyDictionary()

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.requests = Counter("tts_wyoming_requests", "Wyoming synthesis requests by engine and outcome "
                                "(ok, cancelled, or the error kind: not_found, invalid, unavailable, timed_out, …)",
                                ["engine", "outcome"], registry=r)
        self.connections = Gauge("tts_wyoming_connections", "Open Wyoming connections", registry=r)

    @classmethod
    def of(cls, metrics: Metrics) -> WyomingMetrics:
        if metrics not in cls._by_registry:
            cls._by_registry[metrics] = cls(metrics)
        return cls._by_registry[metrics]
