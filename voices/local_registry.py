"""LocalVoiceRegistry: the voice registry in the gateway's data directory (one node).

Layout under ``<data_dir>/voices``:
  blobs/<k[:2]>/<key>.safetensors   latents; key = latents_key(audio sha256, engine, model sha256)
  index/                            diskcache (SQLite), eviction off; values are JSON bytes:
                                      voice:<name> → the `VoiceRecord`
                                      audio:<key>  → {"latents_sha256": …} (the upload cache)
  quarantine/                       blobs that failed verification and that nothing uses
  .lock                             flock: commit sections of every process using this directory

A blob is written once, under its key's lock, and never overwritten: the same audio on the same engine
and model always has the same key, and `tts_gateway.voices.blobs.encode` makes its bytes canonical, so
every record of that audio names the same bytes. A voice is acknowledged only once its record is in the
index, written after its blob is durably on disk; a crash in between leaves at most an orphan blob, which
the next conditioning of that audio adopts, or ``check(fix=True)`` removes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import diskcache
import numpy as np

from tts_gateway.errors import InvalidField
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.blobs import CorruptBlob, blob_metadata, contradicts, encode, problem, sha256_hex
from tts_gateway.voices.cache import LatentCache, Latents
from tts_gateway.voices.names import NAME_RULE, valid_voice_name
from tts_gateway.voices.registry import (
    ComputeLatents,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    latents_key,
)
from tts_gateway.voices.store import LatentStore

log = logging.getLogger(__name__)

class _CommitLock:
    """Re-entrant within a process, exclusive across processes (``flock``, held only while locked).

    Always taken after a key lock, never before one, so the two cannot deadlock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._depth == 0:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException:
                self._lock.release()
                raise
            self._fd = fd
        self._depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                fd, self._fd = self._fd, -1
                os.close(fd)  # releases the flock
        finally:
            self._lock.release()


class LocalVoiceRegistry:
    """`VoiceRegistry` over files and a diskcache index in ``<data_dir>/voices``.

    Args:
        data_dir: The gateway's data directory.
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        on_conditioning: Callable[[str], None] = lambda engine: None,
        on_cache_hit: Callable[[str], None] = lambda engine: None,
        memory_entries: int = 64,
    ) -> None:
        self.root = data_dir / "voices"
        self.store = LatentStore(self.root / "blobs")
        # eviction_policy="none": the default culls past 1 GB, which would silently drop voices.
        self.index = diskcache.Cache(
            str(self.root / "index"), eviction_policy="none", sqlite_synchronous=2, size_limit=2**62
        )
        self.cache = LatentCache(memory_entries)
        self._on_conditioning = on_conditioning
        self._on_cache_hit = on_cache_hit
        self._commit = _CommitLock(self.root / ".lock")

    def __repr__(self) -> str:
        return f"LocalVoiceRegistry({str(self.root)!r})"

    @property
    def _memory(self) -> LatentCache:
        """Deprecated alias of `cache` (tests used to clear ``_memory``)."""
        return self.cache

    def close(self) -> None:
        self.index.close()

    # -- reading --------------------------------------------------------------------------------
    def get(self, name: str) -> VoiceRecord:
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        data = self.index.get(f"voice:{name}")
        if not isinstance(data, bytes):
            raise VoiceNotFound(name)
        return VoiceRecord.from_json(data)

    def exists(self, name: str) -> bool:
        return valid_voice_name(name) and f"voice:{name}" in self.index

    def records(self) -> list[VoiceRecord]:
        records = []
        for key in self.index.iterkeys():
            if isinstance(key, str) and key.startswith("voice:"):
                data = self.index.get(key)
                if isinstance(data, bytes):
                    records.append(VoiceRecord.from_json(data))
        return sorted(records, key=lambda r: r.name)

    def latents(self, record: VoiceRecord) -> dict[str, np.ndarray]:
        """Verified latents of a preset; never recomputes. Raises `VoiceBroken`."""
        try:
            return self.load_latents(record.latents_key, record.latents_sha256)
        except CorruptBlob as exc:
            self._mark_broken(record, str(exc))
            raise VoiceBroken(record.name, str(exc)) from None

    def load_latents(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """Blob ``key`` verified against ``sha256``; raises `CorruptBlob`.

        A file that fails is quarantined, unless another record or the upload cache uses exactly its bytes
        (then only the caller's sha256 is stale, and the file stays for the others).
        """
        cached = self.cache.get(sha256)
        if cached is not None:
            return cached
        data = self.store.read(key)
        if data is None:
            raise CorruptBlob(key, "file is missing")
        try:
            return self.cache.verify(data, sha256, label=key)
        except CorruptBlob:
            self._quarantine_unless_used(key, data)
            raise

    def forget(self, sha256: str) -> None:
        self.cache.forget(sha256)

    # -- conditioning ---------------------------------------------------------------------------
    def condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Latents for this audio on this engine and model: stored ones if any, else computed once.

        Returns (blob key, blob sha256, latents). Single-flight per key: a second caller waits for the
        first and reuses its blob.
        """
        key = latents_key(reference.sha256, engine, model_sha256)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        with self.cache.lock(key):
            stored = self._stored(key, meta)
            if stored is not None:
                self._on_cache_hit(engine)
                sha, latents = stored
                return key, sha, latents
            computed = compute(reference.samples)
            self._on_conditioning(engine)
            with self._commit:
                sha, latents = self._commit_blob(key, computed, meta)
            return key, sha, latents

    def _stored(self, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
        """The usable stored latents of ``key`` (caller holds its lock), or None."""
        sha = self._pointer(key)
        if sha is not None:
            try:
                return sha, self.load_latents(key, sha)
            except CorruptBlob as exc:
                log.warning("stored latents unusable: %s", exc)
                with self._commit:
                    self._drop_pointer(key, sha)
        with self._commit:
            return self._adopt(key, meta)

    def _adopt(self, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
        """A valid blob already at ``key`` without an upload-cache entry (a crash between the two, or data
        from an older version) is used as it is, never overwritten. Caller holds the key and commit locks."""
        data = self.store.read(key)
        if data is None:
            return None
        sha = sha256_hex(data)
        if contradicts(data, meta):
            self._quarantine_unless_used(key, data)
            return None
        try:
            latents = self.cache.verify(data, sha, label=key)
        except CorruptBlob:
            self._quarantine_unless_used(key, data)
            return None
        self._set_pointer(key, sha)
        return sha, latents

    def _commit_blob(self, key: str, latents: Latents, meta: dict[str, str]) -> tuple[str, Latents]:
        """Store freshly computed latents as ``key`` unless a valid blob is already there (then that one
        wins); returns (sha256, the latents the stored blob holds). Caller holds the key and commit locks."""
        adopted = self._adopt(key, meta)
        if adopted is not None:
            return adopted
        data = encode(latents, meta)
        sha = sha256_hex(data)
        if not self.store.write(key, data):
            raise CorruptBlob(key, "another blob that is in use occupies this key")
        stored = self.cache.verify(data, sha, label=key)  # exactly what the blob holds (float32)
        self._set_pointer(key, sha)
        return sha, stored

    # -- writing --------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        *,
        engine: str,
        reference: ReferenceAudio,
        compute: ComputeLatents,
        model_id: str,
        model_sha256: str,
        licence: str,
        language: str | None = None,
        description: str = "",
        consent: bool = False,
    ) -> VoiceRecord:
        """Register a preset; raises `VoiceExists` if the name is taken (checked again at commit)."""
        if not valid_voice_name(name):
            raise InvalidField("name", NAME_RULE)
        if self.exists(name):
            raise VoiceExists(name)
        key = latents_key(reference.sha256, engine, model_sha256)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        # The key's lock spans conditioning and commit: a delete of another preset of the same audio
        # cannot remove the blob in between.
        with self.cache.lock(key):
            _key, sha, latents = self.condition(reference, engine, model_sha256, compute)
            with self._commit:
                if self.store.sha256_of(key) != sha:  # changed behind this process's back: store it again
                    sha, latents = self._commit_blob(key, latents, meta)
                record = VoiceRecord.new(name, reference, latents_key=key, latents_sha256=sha, engine=engine,
                                         language=language, description=description, consent=consent,
                                         licence=licence, model_id=model_id, model_sha256=model_sha256)
                # diskcache's add is one SQLite transaction: of two racing creators exactly one wins.
                if not self.index.add(f"voice:{name}", record.to_json()):
                    raise VoiceExists(name)
        return record

    def delete(self, name: str) -> VoiceRecord:
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        while True:
            key = self.get(name).latents_key
            with self.cache.lock(key), self._commit:
                data = self.index.get(f"voice:{name}")
                if not isinstance(data, bytes):
                    raise VoiceNotFound(name)
                record = VoiceRecord.from_json(data)
                if record.latents_key != key:  # deleted and registered again with other audio meanwhile
                    continue
                if not self.index.delete(f"voice:{name}"):
                    raise VoiceNotFound(name)
                self.cache.forget(record.latents_sha256)
                # Free the blob unless another preset shares it (same audio registered twice).
                if not any(r.latents_key == key for r in self.records()):
                    pointer = self._pointer(key)
                    self.index.delete(f"audio:{key}")
                    self.store.delete(key)
                    if pointer is not None:
                        self.cache.forget(pointer)
                return record

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs and leftover temp files; ``fix`` marks the broken voices
        and removes the rest (a blob another voice still uses is never removed)."""
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        broken: list[tuple[VoiceRecord, str]] = []
        with self._commit:  # a consistent picture: no blob or record write is half done
            records = self.records()
            for record in records:
                detail = ("marked broken" if record.status == "broken"
                          else problem(self.store.read(record.latents_key), record.latents_sha256))
                if detail is not None:
                    report["broken"].append(record.name)
                    broken.append((record, detail))
            referenced = {r.latents_key for r in records} | set(self._pointers())
            report["orphans"] = [key for key in self.store.keys() if key not in referenced]
            temp_files = self.store.temp_files()
            report["temp_files"] = [str(tmp) for tmp in temp_files]
            if fix:
                for tmp in temp_files:  # nobody writes while the commit lock is held
                    tmp.unlink(missing_ok=True)
        if fix:
            for record, detail in broken:
                if record.status != "broken":
                    self._mark_broken(record, detail)
                self._quarantine_unless_used(record.latents_key)
            for key in report["orphans"]:
                self._drop_orphan(key)
        return report

    # -- internals ------------------------------------------------------------------------------
    def _pointer(self, key: str) -> str | None:
        data = self.index.get(f"audio:{key}")
        return str(json.loads(data)["latents_sha256"]) if isinstance(data, bytes) else None

    def _pointers(self) -> dict[str, str]:
        found = {}
        for name in self.index.iterkeys():
            if isinstance(name, str) and name.startswith("audio:"):
                sha = self._pointer(name.removeprefix("audio:"))
                if sha is not None:
                    found[name.removeprefix("audio:")] = sha
        return found

    def _set_pointer(self, key: str, sha256: str) -> None:
        if self._pointer(key) != sha256:
            self.index.set(f"audio:{key}", json.dumps({"latents_sha256": sha256}).encode())

    def _drop_pointer(self, key: str, sha256: str) -> None:
        if self._pointer(key) == sha256:
            self.index.delete(f"audio:{key}")

    def _users(self, key: str) -> set[str]:
        """The sha256s that records and the upload cache expect of blob ``key``."""
        users = {r.latents_sha256 for r in self.records() if r.latents_key == key}
        pointer = self._pointer(key)
        if pointer is not None:
            users.add(pointer)
        return users

    def _quarantine_unless_used(self, key: str, seen: bytes | None = None) -> None:
        """Move blob ``key`` aside unless its bytes verify for a record or the upload cache."""
        with self.cache.lock(key), self._commit:
            data = self.store.read(key)
            if data is None or (seen is not None and data != seen):
                return  # gone, or replaced since the caller looked
            sha = sha256_hex(data)
            if sha in self._users(key) and problem(data, sha) is None:
                return  # another voice's good blob: the caller's sha256 is the stale one
            self.cache.forget(sha)
            self.store.quarantine(key, seen=data)
            self._drop_pointer(key, sha)

    def _drop_orphan(self, key: str) -> None:
        with self.cache.lock(key), self._commit:
            if self._pointer(key) is not None or any(r.latents_key == key for r in self.records()):
                return  # used again since check looked
            sha = self.store.sha256_of(key)
            if sha is not None:
                self.cache.forget(sha)
            self.store.delete(key)

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        self.cache.forget(record.latents_sha256)
        with self._commit:
            current = self.index.get(f"voice:{record.name}")
            if isinstance(current, bytes):
                fresh = VoiceRecord.from_json(current)
                if fresh.latents_sha256 == record.latents_sha256 and fresh.status != "broken":
                    fresh.status = "broken"
                    fresh.extra["broken_reason"] = detail
                    self.index.set(f"voice:{record.name}", fresh.to_json())
        log.error("voice %s marked broken: %s", record.name, detail)
