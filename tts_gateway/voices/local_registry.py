"""LocalVoiceRegistry: the voice registry in the gateway's data directory (one node).

Layout under ``<data_dir>/voices``:
  blobs/<k[:2]>/<key>.safetensors   latents; key = latents_key(audio sha256, engine, model sha256); the metadata
                                    names engine, model sha256 and audio sha256, so the key can be checked
  records/<name>.json               each preset's record, byte for byte what the index holds (sorted-key JSON),
                                    written atomically before the index entry; ``records/.index-id`` names the
                                    index these files belong to
  index/                            diskcache (SQLite): presets, the upload cache, the index id
                                    (`tts_gateway.voices.local_index`)
  index.damaged-<time>/             an index a rebuild moved aside (`tts_gateway.voices.local_rebuild`)
  quarantine/                       blobs (and record files) that failed verification and that nothing uses
                                    (`tts_gateway.voices.local_check`)
  .lock                             flock: commit sections of every process using this directory

A blob is written once, under its key's lock, and never overwritten: the same audio on the same engine
and model always has the same key, and `tts_gateway.voices.blobs.encode` makes its bytes canonical, so
every record of that audio names the same bytes. A voice is acknowledged only once its record is in the
index, written after its record file and its blob are durably on disk; a crash in between leaves at most an
orphan blob, which the next conditioning of that audio adopts or ``check(fix=True)`` removes, and a record
file the index lacks, which ``check(fix=True)`` removes (the index decides while it is whole; a missing
record file is written again at the next open).

The index is the one file a rebuild replaces: `rebuild_index` (``tts-gateway registry rebuild``) makes a new
one from the record files and the blobs, verifying every blob's sha256. An index found damaged, missing or
replaced when the registry opens is rebuilt right there with ``rebuild_damaged`` (the gateway's start), the
damaged one moved aside. Otherwise (``rebuild_damaged`` off, a rebuild that failed, damage found while
running) nothing raises at construction: the registry reports itself unavailable (`health`, and
`RegistryUnavailable` from every call, HTTP 503) until it is rebuilt, and reopens by itself once it has been.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import diskcache
import numpy as np

from tts_gateway.voices.blobs import CorruptBlob, contradicts, encode, sha256_hex
from tts_gateway.voices.cache import Latents
from tts_gateway.voices.local_check import LocalCheck
from tts_gateway.voices.local_index import (
    STORAGE_ERRORS,
    CommitLock,
    LocalIndex,
    drop_pointer,
    index_records,
    parse_record,
    pointer,
    pointer_entries,
    pointer_json,
    set_pointer,
)
from tts_gateway.voices.local_rebuild import rebuild_index, rebuild_locked
from tts_gateway.voices.names import valid_voice_name
from tts_gateway.voices.registry import VoiceBroken, VoiceExists, VoiceNotFound, VoiceRecord
from tts_gateway.voices.registry_base import UPLOAD_CACHE_ENTRIES, Conditioned, NewVoice, RegistryBase
from tts_gateway.voices.store import RecordFiles, StorageUnavailable, storage_error

log = logging.getLogger(__name__)

__all__ = ["LocalVoiceRegistry", "rebuild_index"]


class LocalVoiceRegistry(RegistryBase):
    """`VoiceRegistry` over files and a diskcache index in ``<data_dir>/voices``.

    Args:
        data_dir: The gateway's data directory.
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
        upload_cache_entries: How many upload-cache entries (latents no preset uses) to keep on disk; past
            that, the least recently used go with their blobs.
        rebuild_damaged: Rebuild an index found damaged, missing or replaced here, at construction (what
            ``tts-gateway registry rebuild`` does, under the same lock), so that a start recovers the presets by
            itself. Off, such an index is only reported (``health``, 503) until it is rebuilt.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        on_conditioning: Callable[[str], None] = lambda engine: None,
        on_cache_hit: Callable[[str], None] = lambda engine: None,
        memory_entries: int = 64,
        upload_cache_entries: int = UPLOAD_CACHE_ENTRIES,
        rebuild_damaged: bool = False,
    ) -> None:
        self.root = data_dir / "voices"
        super().__init__(data_dir, self.root / "blobs", on_conditioning=on_conditioning, on_cache_hit=on_cache_hit,
                         memory_entries=memory_entries, upload_cache_entries=upload_cache_entries)
        self.record_files = RecordFiles(self.root / "records")
        self._index = LocalIndex(data_dir, self.root, store=self.store, record_files=self.record_files)
        self._commit: CommitLock = self._index.commit
        self._checks = LocalCheck(self._index, self.store, self.record_files, self.cache)
        self._index.open(partial(rebuild_locked, data_dir) if rebuild_damaged else None)

    def __repr__(self) -> str:
        return f"LocalVoiceRegistry({str(self.root)!r})"

    def close(self) -> None:
        self._index.close()

    def health(self) -> str | None:
        """None while presets can be read, else why not (the file and the recovery step; one line).

        A full or read-only disk under an open index is not reported here: reads still work, and writes
        answer `RegistryUnavailable` themselves.
        """
        return self._index.health()

    @property
    def index(self) -> diskcache.Cache:
        """The open index; `RegistryUnavailable` while it is damaged, missing or cannot be opened."""
        return self._index.ready()

    # -- reading --------------------------------------------------------------------------------
    def get(self, name: str) -> VoiceRecord:
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        with self._index.guard():
            data = self._index.ready().get(f"voice:{name}")
        if not isinstance(data, bytes):
            raise VoiceNotFound(name)
        record = parse_record(name, data)
        if record is None:
            raise VoiceBroken(name, "its record is unreadable")
        return record

    def exists(self, name: str) -> bool:
        if not valid_voice_name(name):
            return False
        with self._index.guard():
            return f"voice:{name}" in self._index.ready()

    def records(self) -> list[VoiceRecord]:
        with self._index.guard():
            return index_records(self._index.ready())

    def load_latents(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """Blob ``key`` verified against ``sha256``; raises `CorruptBlob`.

        A file that fails is quarantined, unless another record or the upload cache uses exactly its bytes
        (then only the caller's sha256 is stale, and the file stays for the others).
        """
        cached = self.cache.get(sha256)
        if cached is not None:
            return cached
        with self._index.guard():
            data = self.store.read(key)
        if data is None:
            raise CorruptBlob(key, "file is missing")
        try:
            return self.cache.verify(data, sha256, label=key)
        except CorruptBlob:
            self._checks.quarantine_unless_used(key, data)
            raise

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        self._checks.mark_broken(record, detail)

    # -- conditioning ---------------------------------------------------------------------------
    def _stored(self, key: str, meta: dict[str, str], *, for_preset: bool) -> Conditioned | None:
        try:
            with self._index.guard():
                stored = self._usable(key, meta)
        except StorageUnavailable:  # adopting a stored blob needs a write; the upload path can do without
            if for_preset:
                raise
            return None
        return None if stored is None else Conditioned(key, *stored)

    def _store(self, key: str, meta: dict[str, str], computed: Latents, *, for_preset: bool) -> Conditioned:
        try:
            with self._index.guard(), self._index.locked() as index:
                sha, latents = self._commit_blob(index, key, computed, meta)
        except StorageUnavailable as exc:
            if for_preset:
                raise
            data = encode(computed, meta)
            sha = sha256_hex(data)
            log.warning("upload latents not cached: %s", exc.detail)
            return Conditioned(key, sha, self.cache.verify(data, sha, label=key))
        return Conditioned(key, sha, latents)

    def _preflight(self) -> None:
        """`StorageUnavailable` when the data directory is read-only or has no space left at all."""
        try:
            stat = os.statvfs(self.root if self.root.exists() else self.data_dir)
        except OSError:
            return
        free = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail
        code = errno.EROFS if stat.f_flag & os.ST_RDONLY else errno.ENOSPC if free == 0 else None
        if code is not None:
            translated = storage_error(OSError(code, os.strerror(code)), self.data_dir)
            if translated is not None:
                raise translated

    def _usable(self, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
        """The usable stored latents of ``key`` (caller holds its lock), or None."""
        index = self._index.ready()
        sha = pointer(index, key)
        if sha is not None:
            try:
                latents = self.load_latents(key, sha)
            except CorruptBlob as exc:
                log.warning("stored latents unusable: %s", exc)
                with self._index.locked() as locked:
                    drop_pointer(locked, key, sha)
            else:
                self._touch(index, key, sha)
                return sha, latents
        with self._index.locked() as locked:
            return self._adopt(locked, key, meta)

    def _adopt(self, index: diskcache.Cache, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
        """A valid blob already at ``key`` without an upload-cache entry (a crash between the two, or data
        from an older version) is used as it is, never overwritten. Caller holds the key and commit locks."""
        data = self.store.read(key)
        if data is None:
            return None
        sha = sha256_hex(data)
        if contradicts(data, meta):
            self._checks.quarantine_unless_used(key, data)
            return None
        try:
            latents = self.cache.verify(data, sha, label=key)
        except CorruptBlob:
            self._checks.quarantine_unless_used(key, data)
            return None
        set_pointer(index, key, sha)
        self._bound_upload_cache(index, keep=key)
        return sha, latents

    def _commit_blob(self, index: diskcache.Cache, key: str, latents: Latents,
                     meta: dict[str, str]) -> tuple[str, Latents]:
        """Store freshly computed latents as ``key`` unless a valid blob is already there (then that one
        wins); returns (sha256, the latents the stored blob holds). Caller holds the key and commit locks.
        On a storage error nothing of it is left: no temp file, no blob without its upload-cache entry."""
        adopted = self._adopt(index, key, meta)
        if adopted is not None:
            return adopted
        data = encode(latents, meta)
        sha = sha256_hex(data)
        try:
            if not self.store.write(key, data):
                raise CorruptBlob(key, "another blob that is in use occupies this key")
            set_pointer(index, key, sha)
        except BaseException:
            self._undo_blob(key, data)
            raise
        stored = self.cache.verify(data, sha, label=key)  # exactly what the blob holds (float32)
        self._bound_upload_cache(index, keep=key)
        return sha, stored

    def _undo_blob(self, key: str, data: bytes) -> None:
        """Remove a blob this commit wrote (it holds ``data``; nothing refers to it yet; the caller holds the
        commit lock, so no other process wrote it) after a later step failed: not worth an orphan."""
        try:
            if self.store.read(key) == data:
                self.store.delete(key)
        except OSError as exc:
            log.warning("latent blob %s left behind (%s); `tts-gateway registry check --fix` removes it", key[:12],
                        exc)

    # -- writing --------------------------------------------------------------------------------
    def _insert(self, voice: NewVoice, conditioned: Conditioned) -> VoiceRecord:
        """The record file first (durable, for a rebuild), then the index entry: the acknowledgement."""
        name, key, sha, latents = voice.name, voice.key, conditioned.sha256, conditioned.latents
        with self._index.guard(), self._index.locked() as index:
            if self.store.sha256_of(key) != sha:  # changed behind this process's back: store it again
                sha, latents = self._commit_blob(index, key, latents, voice.meta)
            record = voice.record(sha)
            data = record.to_json()
            if f"voice:{name}" in index:
                raise VoiceExists(name)
            self.record_files.write(name, data)
            try:
                added = index.add(f"voice:{name}", data)
            except BaseException:
                self._discard_record_file(name)
                raise
            if not added:  # cannot happen under the commit lock; never leave our file for another's voice
                self._index.sync_record_files(index, remove_stale=False)
                raise VoiceExists(name)
        return record

    def _discard_record_file(self, name: str) -> None:
        try:
            self.record_files.delete(name)
        except OSError as exc:
            log.warning("voice %s: record file left behind (%s); the next start removes it", name, exc)

    def delete(self, name: str) -> VoiceRecord:
        """Remove a preset: the record first (its record file set aside, then the index entry: the
        acknowledgement; on a storage error nothing changes and `RegistryUnavailable` is raised), then, best
        effort, its blob."""
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        while True:
            try:
                key = self.get(name).latents_key
            except VoiceBroken:  # an unreadable record: it can still be deleted
                key = "0" * 64
            with self.cache.lock(key), self._index.guard(), self._index.locked() as index:
                data = index.get(f"voice:{name}")
                if not isinstance(data, bytes):
                    raise VoiceNotFound(name)
                record = parse_record(name, data) or _unreadable(name)
                if record.latents_key != key:  # deleted and registered again with other audio meanwhile
                    continue
                aside = self.record_files.set_aside(name)
                try:
                    removed = index.delete(f"voice:{name}")  # the acknowledgement
                except BaseException:
                    self._restore_record_file(name, aside)
                    raise
                if aside is not None:
                    _discard(aside)
                if not removed:  # cannot happen under the commit lock
                    raise VoiceNotFound(name)
                self.cache.forget(record.latents_sha256)
                if record.latents_sha256:
                    self._free_blob(index, record)
                return record

    def _restore_record_file(self, name: str, aside: Path | None) -> None:
        if aside is None:
            return
        try:
            self.record_files.restore(aside, name)
        except OSError as exc:
            log.warning("voice %s: record file not restored (%s); the next start writes it again", name, exc)

    def _free_blob(self, index: diskcache.Cache, record: VoiceRecord) -> None:
        """After a delete: remove the blob and its upload-cache entry unless another preset shares them.
        Best effort: the delete stands either way, and what is left is logged (``check --fix`` removes it)."""
        key = record.latents_key
        try:
            if any(r.latents_key == key for r in index_records(index)):
                return  # same audio registered twice: the other preset keeps the blob
            sha = pointer(index, key)
            index.delete(f"audio:{key}")
            if sha is not None:
                self.cache.forget(sha)
            self.store.delete(key)
        except STORAGE_ERRORS as exc:
            reason = storage_error(exc, self.data_dir)
            log.warning("voice %s deleted, but its latents blob %s was not removed (%s); "
                        "`tts-gateway registry check --fix` removes it later", record.name, key[:12],
                        reason.detail if reason else exc)

    # -- the upload cache's bound --------------------------------------------------------------------
    def _touch(self, index: diskcache.Cache, key: str, sha256: str) -> None:
        """Mark an upload-cache entry used now (best effort: a read must not fail on a full disk)."""
        try:
            with index.transact():
                if pointer(index, key) == sha256:
                    index.set(f"audio:{key}", pointer_json(sha256))
        except STORAGE_ERRORS as exc:
            log.debug("upload-cache use of %s not recorded: %s", key[:12], exc)

    def _bound_upload_cache(self, index: diskcache.Cache, *, keep: str) -> None:
        """Past ``upload_cache_entries``, drop the least recently used upload-cache entries no preset uses,
        with their blobs. Caller holds the commit lock (and ``keep``'s key lock: that entry stays). A key
        another thread of this process holds is skipped (it is in use); another process that loses a blob
        meanwhile finds it missing and computes it again."""
        pointers = pointer_entries(index)
        if len(pointers) <= self.upload_cache_entries:
            return
        presets = {r.latents_key for r in index_records(index)}
        unused = sorted((used, key) for key, (_sha, used) in pointers.items() if key not in presets)
        excess = len(unused) - self.upload_cache_entries
        for _used, key in unused:
            if excess <= 0:
                break
            if key == keep:
                continue
            with self.cache.locks.try_hold(key) as held:
                if not held:
                    continue
                sha = pointers[key][0]
                try:
                    index.delete(f"audio:{key}")
                    self.cache.forget(sha)
                    self.store.delete(key)
                except STORAGE_ERRORS as exc:
                    log.warning("upload cache: %s not evicted: %s", key[:12], exc)
                    return
                excess -= 1

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Broken voices, orphan blobs and record files, leftover temp files (`LocalCheck.check`)."""
        return self._checks.check(fix)


def _unreadable(name: str) -> VoiceRecord:
    """Stands in for a record the index holds but cannot parse (so that it can be deleted)."""
    return VoiceRecord(name=name, engine="", language=None, description="", consent=False, licence="", model_id="",
                       model_sha256="", audio_sha256="", clip_sha256s=[], duration=0.0, created_at="",
                       latents_key="0" * 64, latents_sha256="", status="broken")


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("%s not removed (%s); `tts-gateway registry check --fix` removes it", path, exc)
