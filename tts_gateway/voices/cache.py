"""What both registries share: verified latents in memory, and one lock per latents key.

`LatentCache` keeps the latents of recently used blobs, by blob sha256 (content-addressed, so an entry
never goes stale), and only ever holds latents that `verify` checked against their sha256. Its
per-key locks make conditioning single-flight: of two threads asking for the same audio on the same
engine and model, one computes and writes the blob, the other waits and reuses it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import numpy as np

from tts_gateway.voices.blobs import decode

Latents = dict[str, np.ndarray]


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0


class KeyLocks:
    """Re-entrant locks created on demand, one per key, dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    @contextmanager
    def try_hold(self, key: str) -> Iterator[bool]:
        """Hold ``key``'s lock if nobody else does (yields True), else yield False at once without it.

        For work that may skip a key in use (eviction) and must not wait while holding other locks."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        acquired = entry.lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                entry.lock.release()
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)


class LatentCache:
    """An LRU of verified latents by blob sha256, and the per-key locks of the registry that owns it.

    Args:
        entries: How many latent sets to keep.
    """

    def __init__(self, entries: int = 64) -> None:
        self.entries = entries
        self._lru: OrderedDict[str, Latents] = OrderedDict()
        self._lock = threading.Lock()
        self.locks = KeyLocks()

    def get(self, sha256: str) -> Latents | None:
        with self._lock:
            latents = self._lru.get(sha256)
            if latents is not None:
                self._lru.move_to_end(sha256)
            return latents

    def put(self, sha256: str, latents: Latents) -> None:
        """Keep latents already verified against ``sha256`` (`verify` does both)."""
        with self._lock:
            self._lru[sha256] = latents
            self._lru.move_to_end(sha256)
            while len(self._lru) > self.entries:
                self._lru.popitem(last=False)

    def verify(self, data: bytes, sha256: str, *, label: str | None = None) -> Latents:
        """Check ``data`` against ``sha256``, keep and return its latents; raises `CorruptBlob`."""
        latents = decode(data, sha256, label=label)
        self.put(sha256, latents)
        return latents

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._lru.pop(sha256, None)

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def __contains__(self, sha256: object) -> bool:
        with self._lock:
            return sha256 in self._lru

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def lock(self, key: str) -> AbstractContextManager[None]:
        """Hold the lock of one latents key (re-entrant): conditioning and committing that key happen under it."""
        return self.locks.hold(key)

