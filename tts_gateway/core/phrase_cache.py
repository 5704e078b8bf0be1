"""Phrase cache: encoded audio for repeated deterministic requests, answered from disk.

Values are bytes only (no pickle): ``len(meta) | meta JSON | audio``, where the JSON carries the
audio's sha256 (and a timed request's timings). A value that fails the check is deleted and
treated as a miss, never served.
diskcache writes each entry in one SQLite transaction, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from tts_gateway.core.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAudio:
    audio: bytes
    media_type: str
    headers: dict[str, str]
    timings: dict[str, Any] | None = None  # `Timings.as_dict` of a timed request


# What a damaged, full or read-only cache raises; the cache is disposable, so none of it is fatal.
_STORAGE_ERRORS = (OSError, sqlite3.Error)


class PhraseCache:
    """Disposable: a damaged cache is moved aside at start, and failing reads or writes only cost
    a miss (a finished synthesis is never thrown away because its copy could not be kept)."""

    def __init__(self, directory: Path, size_limit: int, metrics: Metrics) -> None:
        self.enabled = size_limit > 0
        self.metrics = metrics
        self.size_limit = size_limit
        self.directory = directory
        self._cache: diskcache.Cache | None = None
        self.hits = 0
        self.misses = 0
        if self.enabled:
            self._cache = self._open()
            self.enabled = self._cache is not None

    def _open(self) -> diskcache.Cache | None:
        for attempt in range(2):
            try:
                # Least-recently-used eviction: unlike the voice registry, losing a phrase is fine.
                cache = diskcache.Cache(str(self.directory), size_limit=self.size_limit,
                                        eviction_policy="least-recently-used", cull_limit=10)
                self.metrics.phrase_bytes.set(cache.volume())
                return cache
            except _STORAGE_ERRORS as exc:
                if attempt == 0 and self.directory.exists():
                    aside = self.directory.with_name(f"{self.directory.name}.damaged-{int(time.time())}")
                    try:
                        self.directory.rename(aside)
                        log.warning("phrase cache %s is damaged (%s); moved it to %s and started a new one",
                                    self.directory, exc, aside)
                        continue
                    except OSError:
                        pass
                log.warning("phrase cache %s cannot be opened (%s); running without it", self.directory, exc)
                return None
        return None

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> CachedAudio | None:
        if self._cache is None:
            return None
        try:
            value = self._cache.get(key)
        except _STORAGE_ERRORS as exc:
            log.warning("phrase cache read failed (%s); treated as a miss", exc)
            value = None
        found = None
        if isinstance(value, bytes):
            found = self._decode(key, value)
        if found is None:
            self.misses += 1
            self.metrics.phrase_misses.inc()
        else:
            self.hits += 1
            self.metrics.phrase_hits.inc()
        return found

    def _decode(self, key: str, value: bytes) -> CachedAudio | None:
        try:
            size = int.from_bytes(value[:4], "big")
            meta = json.loads(value[4 : 4 + size])
            audio = value[4 + size :]
            if hashlib.sha256(audio).hexdigest() != meta["sha256"]:
                raise ValueError("sha256 mismatch")
            timings = meta.get("timings")
            if timings is not None and not isinstance(timings, dict):
                raise ValueError("timings are not an object")
            return CachedAudio(audio, str(meta["media_type"]), dict(meta["headers"]), timings)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("phrase cache entry %s… is corrupt (%s); dropped", key[:12], exc)
            assert self._cache is not None
            try:
                self._cache.delete(key)
            except _STORAGE_ERRORS:
                pass
            return None

    def put(self, key: str, audio: bytes, media_type: str, headers: dict[str, str],
            timings: dict[str, Any] | None = None) -> None:
        if self._cache is None or not audio:
            return
        fields: dict[str, Any] = {"sha256": hashlib.sha256(audio).hexdigest(), "media_type": media_type,
                                  "headers": headers}
        if timings is not None:
            fields["timings"] = timings
        meta = json.dumps(fields).encode()
        try:
            self._cache.set(key, len(meta).to_bytes(4, "big") + meta + audio)
            self.metrics.phrase_bytes.set(self._cache.volume())
        except _STORAGE_ERRORS as exc:  # full or read-only disk: the client still gets its audio
            log.warning("phrase cache write failed (%s); the result was not cached", exc)

    def clear(self) -> int:
        if self._cache is None:
            return 0
        removed = int(self._cache.clear())
        self.metrics.phrase_bytes.set(self._cache.volume())
        return removed

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "entries": len(self._cache) if self._cache is not None else 0,
            "bytes": self._cache.volume() if self._cache is not None else 0,
            "size_limit": self.size_limit,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": (self.hits / lookups) if lookups else None,
        }

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
