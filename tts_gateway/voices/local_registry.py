"""LocalVoiceRegistry: the voice registry in the gateway's data directory (one node).

Layout under ``<data_dir>/voices``:
  blobs/<k[:2]>/<key>.safetensors   latents; key = latents_key(audio sha256, engine, model sha256); the metadata
                                    names engine, model sha256 and audio sha256, so the key can be checked
  records/<name>.json               each preset's record, byte for byte what the index holds (sorted-key JSON),
                                    written atomically before the index entry; ``records/.index-id`` names the
                                    index these files belong to
  index/                            diskcache (SQLite), eviction off; values are JSON bytes:
                                      voice:<name>  → the `VoiceRecord`
                                      audio:<key>   → {"latents_sha256", "used"} (the upload cache)
                                      meta:index_id → the id ``records/.index-id`` must hold
  index.damaged-<time>/             an index `rebuild_index` moved aside
  quarantine/                       blobs (and record files) that failed verification and that nothing uses
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
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import diskcache
import numpy as np

from tts_gateway.errors import InvalidField, TTSGatewayError
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.blobs import (
    CorruptBlob,
    blob_metadata,
    contradicts,
    encode,
    problem,
    read_metadata,
    sha256_hex,
)
from tts_gateway.voices.cache import LatentCache, Latents
from tts_gateway.voices.names import NAME_RULE, valid_voice_name
from tts_gateway.voices.registry import (
    ComputeLatents,
    RegistryUnavailable,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    latents_key,
)
from tts_gateway.voices.store import LatentStore, RecordFiles, StorageUnavailable, fsync_dir, storage_error

log = logging.getLogger(__name__)

REBUILD_COMMAND = "tts-gateway registry rebuild"
UPLOAD_CACHE_ENTRIES = 256  # upload-cache entries (latents of ``/synthesize`` uploads no preset uses) kept
_INDEX_ID = "meta:index_id"
_INDEX_DB = "cache.db"
_RETRY_S = 2.0  # how soon an index that could not be opened for an environmental reason is tried again
_STORAGE_ERRORS = (OSError, sqlite3.Error)


def _index_cache(directory: Path) -> diskcache.Cache:
    # eviction_policy="none": the default culls past 1 GB, which would silently drop voices.
    return diskcache.Cache(str(directory), eviction_policy="none", sqlite_synchronous=2, size_limit=2**62)


def _is_damage(exc: BaseException) -> bool:
    """Whether an SQLite error says the file's content is bad (not that the disk is full, read-only or busy)."""
    if not isinstance(exc, sqlite3.DatabaseError) or isinstance(exc, sqlite3.IntegrityError):
        return False
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT"))
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _damaged(db: Path, why: str) -> str:
    return (f"the voice index {db} is {why}; presets cannot be used until it is rebuilt — run "
            f"`{REBUILD_COMMAND}` (built-in voices keep working)")


class _CommitLock:
    """Re-entrant within a process, exclusive across processes (``flock``, held only while locked).

    Always taken after a key lock, never before one, so the two cannot deadlock. On a read-only disk the
    lock file is opened read-only (flock works on it), so reads that take the lock keep working.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if not self.path.exists():
                raise
            return os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._depth == 0:
            try:
                fd = self._open()
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
        self.data_dir = data_dir
        self.root = data_dir / "voices"
        self.index_dir = self.root / "index"
        self.store = LatentStore(self.root / "blobs")
        self.record_files = RecordFiles(self.root / "records")
        self.cache = LatentCache(memory_entries)
        self.upload_cache_entries = max(0, upload_cache_entries)
        self._on_conditioning = on_conditioning
        self._on_cache_hit = on_cache_hit
        self._commit = _CommitLock(self.root / ".lock")
        self._state = threading.RLock()  # guards the index handle and the problem below
        self._index: diskcache.Cache | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open index file
        self._problem: str | None = None  # why the registry cannot serve, while it cannot
        self._problem_code = "registry-damaged"
        self._damaged = False  # the index's content is bad: it is opened again only once the file is replaced
        self._damage = ""  # what is wrong with the index's content, while it is damaged
        self._damaged_identity: tuple[int, int] | None = None
        self._retry_at = 0.0
        try:
            with self._commit, self._state:
                self._open_index(announce=False)
                if self._damaged and rebuild_damaged:
                    self._rebuild_at_start()
                elif self._problem is not None:
                    log.error("voice registry unavailable: %s", self._problem)
        except OSError as exc:  # not even the lock file can be made: the data directory is unusable
            with self._state:
                self._set_problem(*self._cannot_open(exc), damaged=False)

    def __repr__(self) -> str:
        return f"LocalVoiceRegistry({str(self.root)!r})"

    def close(self) -> None:
        with self._state:
            index, self._index = self._index, None
            if index is not None:
                index.close()

    # -- health and the index's life --------------------------------------------------------------
    def health(self) -> str | None:
        """None while presets can be read, else why not (the file and the recovery step; one line).

        A full or read-only disk under an open index is not reported here: reads still work, and writes
        answer `RegistryUnavailable` themselves.
        """
        try:
            with self._guard():
                self._ready().get(_INDEX_ID)
        except TTSGatewayError as exc:
            return exc.detail
        return None

    @property
    def index(self) -> diskcache.Cache:
        """The open index; `RegistryUnavailable` while it is damaged, missing or cannot be opened."""
        return self._ready()

    def _db(self) -> Path:
        return self.index_dir / _INDEX_DB

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._db())
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _ready(self) -> diskcache.Cache:
        """The open index, reopened when it was replaced (a rebuild) or an earlier failure may have passed.

        Lock order: the commit lock before ``_state``, never the other way round.
        """
        with self._state:
            identity = self._file_identity()
            if self._index is not None and identity == self._identity:
                return self._index
            if self._index is None and self._problem is not None:
                replaced = self._damaged and identity != self._damaged_identity
                if not replaced and time.monotonic() < self._retry_at:
                    raise self._unavailable()
        with self._commit, self._state:
            if self._index is None or self._file_identity() != self._identity:
                self._open_index()
            if self._index is None:
                raise self._unavailable()
            return self._index

    def _unavailable(self) -> RegistryUnavailable:
        detail = self._problem or "the voice registry cannot be opened"
        if self._problem_code.startswith("storage"):
            return StorageUnavailable(detail, code=self._problem_code)
        return RegistryUnavailable(detail, code=self._problem_code, retry_after=30)

    def _cannot_open(self, exc: BaseException) -> tuple[str, str]:
        """(detail, code) of an index that cannot be opened for a reason other than its content."""
        db = self._db()
        translated = storage_error(exc, self.data_dir)
        if translated is None:
            return f"the voice index {db} cannot be opened: {exc}", "storage-error"
        return f"{translated.detail} (the voice index {db} cannot be opened)", translated.code

    def _set_problem(self, detail: str, code: str = "registry-damaged", *, damaged: bool,
                     announce: bool = True) -> None:
        """Record why the registry cannot serve; logged once per change (one line: the file and what to do)."""
        if detail != self._problem and announce:
            log.error("voice registry unavailable: %s", detail)
        self._problem, self._problem_code = detail, code
        self._damaged, self._damaged_identity = damaged, self._file_identity()
        self._retry_at = float("inf") if damaged else time.monotonic() + _RETRY_S

    def _set_damaged(self, why: str, *, announce: bool = True) -> None:
        why = " ".join(why.split())  # one line: SQLite's integrity report spans several
        self._set_problem(_damaged(self._db(), why), damaged=True, announce=announce)
        self._damage = why

    def _open_index(self, *, announce: bool = True) -> None:
        """Open the index (create it for a new data directory). Caller holds the commit lock and ``_state``.
        On failure the registry is unavailable, with the reason (logged when ``announce``); nothing on disk is
        changed."""
        if self._index is not None:
            old, self._index = self._index, None
            try:
                old.close()
            except _STORAGE_ERRORS:
                pass
        db = self._db()
        identity = self._file_identity()
        try:
            missing = identity is None or db.stat().st_size == 0
            if missing and self._holds_data():
                self._set_damaged("missing" if identity is None else "empty", announce=announce)
                return
            if not missing:
                self._quick_check(db)
            index = _index_cache(self.index_dir)
            try:
                belongs = self._claim(index, fresh=missing)
            except BaseException:
                index.close()
                raise
            if belongs is not None:
                index.close()
                self._set_damaged(belongs, announce=announce)
                return
        except _STORAGE_ERRORS as exc:
            if _is_damage(exc):
                self._set_damaged(f"damaged ({exc})", announce=announce)
                return
            self._set_problem(*self._cannot_open(exc), damaged=False, announce=announce)
            return
        if self._problem is not None:
            log.warning("voice registry available again (%s)", db)
        self._index, self._identity, self._problem, self._damaged = index, self._file_identity(), None, False

    def _rebuild_at_start(self) -> None:
        """Replace the damaged index by one rebuilt from the record files and blobs, as `rebuild_index` does
        (under this registry's commit lock, which the caller holds with ``_state``). The index is derived
        data, so nothing waits for an operator; if the rebuild fails (a read-only or full disk), the registry
        stays unavailable and says why."""
        db = self._db()
        log.warning("voice index %s is %s: rebuilding it from the record files and latent blobs", db, self._damage)
        try:
            _rebuild(self.data_dir, self._commit)
        except Exception as exc:  # the built-in voices must keep working whatever went wrong
            storage = isinstance(exc, _STORAGE_ERRORS)
            translated = storage_error(exc, self.data_dir) if storage else None
            reason = translated.detail if translated is not None else f"{type(exc).__name__}: {exc}"
            if not storage:
                log.exception("voice index rebuild at start failed")
            self._set_damaged(f"{self._damage}, and rebuilding it at start failed ({reason})")
            return
        self._problem = None  # recovered: the reopen below is quiet unless it fails
        self._open_index()

    def _holds_data(self) -> bool:
        return self.record_files.any() or bool(self.store.keys())

    @staticmethod
    def _quick_check(db: Path) -> None:
        """Raise `sqlite3.DatabaseError` when SQLite finds the file damaged (cheap: the index is small)."""
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
        if rows != [("ok",)]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {rows[0][0] if rows else '?'}")

    def _claim(self, index: diskcache.Cache, *, fresh: bool) -> str | None:
        """Match the index with the record files (caller holds the commit lock); None when they belong
        together, else what is wrong with the index. Brings the record files up to date with it."""
        stored = index.get(_INDEX_ID)
        index_id = stored.decode() if isinstance(stored, bytes) else None
        file_id = self.record_files.read_id()
        if index_id is None:
            if file_id is not None and not fresh:
                return "not the one the record files in records/ belong to (replaced?)"
            # A new data directory, or one from before record files: they are written now.
            index_id = uuid.uuid4().hex
            index.set(_INDEX_ID, index_id.encode())
        elif file_id is not None and file_id != index_id:
            return "not the one the record files in records/ belong to (replaced?)"
        try:
            self._sync_record_files(index, remove_stale=False)  # extra files: `check --fix` decides
            if file_id != index_id:
                self.record_files.write_id(index_id)
        except _STORAGE_ERRORS as exc:  # a read-only or full disk: the files catch up at a later open
            log.warning("voice record files not brought up to date: %s", exc)
        return None

    def _sync_record_files(self, index: diskcache.Cache, *, remove_stale: bool) -> list[str]:
        """Write the record file of every indexed preset that lacks an up-to-date one; returns the names of
        record files the index does not know (removed when ``remove_stale``). Caller holds the commit lock."""
        indexed = dict(self._raw_records(index))
        for name, data in indexed.items():
            if self.record_files.read(name) != data:
                self.record_files.write(name, data)
        stale = [name for name in self.record_files.names() if name not in indexed]
        if remove_stale:
            for name in stale:
                self.record_files.delete(name)
        return stale

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Storage and index failures as `RegistryUnavailable` (503) naming the cause, never a 500."""
        try:
            yield
        except TTSGatewayError:
            raise
        except _STORAGE_ERRORS as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> RegistryUnavailable:
        if _is_damage(exc):
            with self._state:
                self._set_damaged(f"damaged ({exc})")
                index, self._index = self._index, None
                if index is not None:
                    try:
                        index.close()
                    except _STORAGE_ERRORS:
                        pass
                return self._unavailable()
        translated = storage_error(exc, self.data_dir)
        if translated is not None:
            return translated
        return StorageUnavailable(f"the voice registry in {self.root} failed: {exc}", code="storage-error")

    @contextmanager
    def _locked(self) -> Iterator[diskcache.Cache]:
        """The commit lock, and the index as it is under it (a rebuild may have replaced it meanwhile)."""
        with self._commit:
            yield self._ready()

    # -- reading --------------------------------------------------------------------------------
    @staticmethod
    def _raw_records(index: diskcache.Cache) -> Iterator[tuple[str, bytes]]:
        for key in index.iterkeys():
            if isinstance(key, str) and key.startswith("voice:"):
                data = index.get(key)
                if isinstance(data, bytes):
                    yield key.removeprefix("voice:"), data

    @staticmethod
    def _parse(name: str, data: bytes) -> VoiceRecord | None:
        try:
            return VoiceRecord.from_json(data)
        except (ValueError, TypeError) as exc:
            log.error("voice %s: its record in the index is unreadable (%s)", name, exc)
            return None

    def _records(self, index: diskcache.Cache) -> list[VoiceRecord]:
        found = (self._parse(name, data) for name, data in self._raw_records(index))
        return sorted((r for r in found if r is not None), key=lambda r: r.name)

    def get(self, name: str) -> VoiceRecord:
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        with self._guard():
            data = self._ready().get(f"voice:{name}")
        if not isinstance(data, bytes):
            raise VoiceNotFound(name)
        record = self._parse(name, data)
        if record is None:
            raise VoiceBroken(name, "its record is unreadable")
        return record

    def exists(self, name: str) -> bool:
        if not valid_voice_name(name):
            return False
        with self._guard():
            return f"voice:{name}" in self._ready()

    def records(self) -> list[VoiceRecord]:
        with self._guard():
            return self._records(self._ready())

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
        with self._guard():
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
        first and reuses its blob. A disk that cannot take the new blob costs only the caching: the
        latents are returned all the same (and the failure logged).
        """
        return self._condition(reference, engine, model_sha256, compute, keep_going=True)

    def _condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents, *,
        keep_going: bool,
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        key = latents_key(reference.sha256, engine, model_sha256)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        with self.cache.lock(key):
            try:
                with self._guard():
                    stored = self._stored(key, meta)
            except StorageUnavailable:  # adopting a stored blob needs a write; the upload path can do without
                if not keep_going:
                    raise
                stored = None
            if stored is not None:
                self._on_cache_hit(engine)
                sha, latents = stored
                return key, sha, latents
            if not keep_going:
                self._preflight()  # before the costly computation
            computed = compute(reference.samples)
            self._on_conditioning(engine)
            try:
                with self._guard(), self._locked() as index:
                    sha, latents = self._commit_blob(index, key, computed, meta)
            except StorageUnavailable as exc:
                if not keep_going:
                    raise
                data = encode(computed, meta)
                sha = sha256_hex(data)
                log.warning("upload latents not cached: %s", exc.detail)
                return key, sha, self.cache.verify(data, sha, label=key)
            return key, sha, latents

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

    def _stored(self, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
        """The usable stored latents of ``key`` (caller holds its lock), or None."""
        index = self._ready()
        sha = self._pointer(index, key)
        if sha is not None:
            try:
                latents = self.load_latents(key, sha)
            except CorruptBlob as exc:
                log.warning("stored latents unusable: %s", exc)
                with self._locked() as locked:
                    self._drop_pointer(locked, key, sha)
            else:
                self._touch(index, key, sha)
                return sha, latents
        with self._locked() as locked:
            return self._adopt(locked, key, meta)

    def _adopt(self, index: diskcache.Cache, key: str, meta: dict[str, str]) -> tuple[str, Latents] | None:
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
        self._set_pointer(index, key, sha)
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
            self._set_pointer(index, key, sha)
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
        extra: dict[str, Any] | None = None,
    ) -> VoiceRecord:
        """Register a preset; raises `VoiceExists` if the name is taken (checked again at commit), and
        `RegistryUnavailable` (nothing written) when the index or the disk cannot take it."""
        if not valid_voice_name(name):
            raise InvalidField("name", NAME_RULE)
        if self.exists(name):
            raise VoiceExists(name)
        key = latents_key(reference.sha256, engine, model_sha256)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        # The key's lock spans conditioning and commit: a delete of another preset of the same audio
        # cannot remove the blob in between.
        with self.cache.lock(key):
            _key, sha, latents = self._condition(reference, engine, model_sha256, compute, keep_going=False)
            with self._guard(), self._locked() as index:
                if self.store.sha256_of(key) != sha:  # changed behind this process's back: store it again
                    sha, latents = self._commit_blob(index, key, latents, meta)
                record = VoiceRecord.new(name, reference, latents_key=key, latents_sha256=sha, engine=engine,
                                         language=language, description=description, consent=consent,
                                         licence=licence, model_id=model_id, model_sha256=model_sha256,
                                         extra=dict(extra or {}))
                data = record.to_json()
                if f"voice:{name}" in index:
                    raise VoiceExists(name)
                # Record file first (durable, for a rebuild), then the index entry: the acknowledgement.
                self.record_files.write(name, data)
                try:
                    added = index.add(f"voice:{name}", data)
                except BaseException:
                    self._discard_record_file(name)
                    raise
                if not added:  # cannot happen under the commit lock; never leave our file for another's voice
                    self._sync_record_files(index, remove_stale=False)
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
            with self.cache.lock(key), self._guard(), self._locked() as index:
                data = index.get(f"voice:{name}")
                if not isinstance(data, bytes):
                    raise VoiceNotFound(name)
                record = self._parse(name, data) or _unreadable(name)
                if record.latents_key != key:  # deleted and registered again with other audio meanwhile
                    continue
                aside = self.record_files.set_aside(name)
                try:
                    removed = index.delete(f"voice:{name}")  # the acknowledgement
                except BaseException:
                    self._restore_record_file(name, aside)
                    raise
                if aside is not None:
                    self._discard(aside)
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

    @staticmethod
    def _discard(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s not removed (%s); `tts-gateway registry check --fix` removes it", path, exc)

    def _free_blob(self, index: diskcache.Cache, record: VoiceRecord) -> None:
        """After a delete: remove the blob and its upload-cache entry unless another preset shares them.
        Best effort: the delete stands either way, and what is left is logged (``check --fix`` removes it)."""
        key = record.latents_key
        try:
            if any(r.latents_key == key for r in self._records(index)):
                return  # same audio registered twice: the other preset keeps the blob
            pointer = self._pointer(index, key)
            index.delete(f"audio:{key}")
            if pointer is not None:
                self.cache.forget(pointer)
            self.store.delete(key)
        except _STORAGE_ERRORS as exc:
            reason = storage_error(exc, self.data_dir)
            log.warning("voice %s deleted, but its latents blob %s was not removed (%s); "
                        "`tts-gateway registry check --fix` removes it later", record.name, key[:12],
                        reason.detail if reason else exc)

    # -- the upload cache's bound --------------------------------------------------------------------
    def _touch(self, index: diskcache.Cache, key: str, sha256: str) -> None:
        """Mark an upload-cache entry used now (best effort: a read must not fail on a full disk)."""
        try:
            with index.transact():
                if self._pointer(index, key) == sha256:
                    index.set(f"audio:{key}", _pointer_json(sha256))
        except _STORAGE_ERRORS as exc:
            log.debug("upload-cache use of %s not recorded: %s", key[:12], exc)

    def _bound_upload_cache(self, index: diskcache.Cache, *, keep: str) -> None:
        """Past ``upload_cache_entries``, drop the least recently used upload-cache entries no preset uses,
        with their blobs. Caller holds the commit lock (and ``keep``'s key lock: that entry stays). A key
        another thread of this process holds is skipped (it is in use); another process that loses a blob
        meanwhile finds it missing and computes it again."""
        pointers = self._pointer_entries(index)
        if len(pointers) <= self.upload_cache_entries:
            return
        presets = {r.latents_key for r in self._records(index)}
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
                except _STORAGE_ERRORS as exc:
                    log.warning("upload cache: %s not evicted: %s", key[:12], exc)
                    return
                excess -= 1

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs and record files, and leftover temp files; ``fix`` marks the
        broken voices and removes the rest (a blob another voice still uses is never removed).

        When the index lists nothing while blobs are stored, the report holds ``"rebuild_needed"`` and no blob
        is removed: a rebuild of the index (``tts-gateway registry rebuild``) may still recover them.
        """
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        broken: list[tuple[VoiceRecord, str]] = []
        with self._guard(), self._locked() as index:  # a consistent picture: no write is half done
            records = self._records(index)
            for record in records:
                detail = ("marked broken" if record.status == "broken"
                          else problem(self.store.read(record.latents_key), record.latents_sha256))
                if detail is not None:
                    report["broken"].append(record.name)
                    broken.append((record, detail))
            pointers = self._pointer_entries(index)
            stale = [name for name in self.record_files.names() if f"voice:{name}" not in index]
            # A blob a record file names is never an orphan: a rebuild would recover its preset.
            filed = {r.latents_key for r in map(partial(_record_file, self.record_files), stale) if r}
            referenced = {r.latents_key for r in records} | set(pointers) | filed
            blobs = self.store.keys()
            orphans = [key for key in blobs if key not in referenced]
            report["orphans"] = orphans + [f"record:{name}" for name in stale]
            temp_files = self.store.temp_files() + self.record_files.temp_files()
            report["temp_files"] = [str(tmp) for tmp in temp_files]
            rebuild_needed = not records and not pointers and bool(blobs or stale)
            if rebuild_needed:
                report["rebuild_needed"] = [
                    f"the voice index {self._db()} lists no voice but {len(blobs)} latent blob(s) and {len(stale)} "
                    f"record file(s) are stored; nothing was deleted — run `{REBUILD_COMMAND}` to recover them"]
                orphans = []
            if fix:
                for tmp in temp_files:  # nobody writes while the commit lock is held
                    tmp.unlink(missing_ok=True)
                self._sync_record_files(index, remove_stale=not rebuild_needed)
        if fix:
            for record, detail in broken:
                if record.status != "broken":
                    self._mark_broken(record, detail)
                with self._guard():
                    self._quarantine_unless_used(record.latents_key)
            for key in orphans:
                with self._guard():
                    self._drop_orphan(key)
        return report

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _pointer(index: diskcache.Cache, key: str) -> str | None:
        data = index.get(f"audio:{key}")
        return str(json.loads(data)["latents_sha256"]) if isinstance(data, bytes) else None

    @staticmethod
    def _pointer_entries(index: diskcache.Cache) -> dict[str, tuple[str, float]]:
        """Every upload-cache entry: key → (blob sha256, when last used)."""
        found = {}
        for name in index.iterkeys():
            if isinstance(name, str) and name.startswith("audio:"):
                data = index.get(name)
                if isinstance(data, bytes):
                    value = json.loads(data)
                    found[name.removeprefix("audio:")] = (str(value["latents_sha256"]), float(value.get("used", 0)))
        return found

    def _set_pointer(self, index: diskcache.Cache, key: str, sha256: str) -> None:
        if self._pointer(index, key) != sha256:
            index.set(f"audio:{key}", _pointer_json(sha256))

    def _drop_pointer(self, index: diskcache.Cache, key: str, sha256: str) -> None:
        if self._pointer(index, key) == sha256:
            index.delete(f"audio:{key}")

    def _users(self, index: diskcache.Cache, key: str) -> set[str]:
        """The sha256s that records and the upload cache expect of blob ``key``."""
        users = {r.latents_sha256 for r in self._records(index) if r.latents_key == key}
        pointer = self._pointer(index, key)
        if pointer is not None:
            users.add(pointer)
        return users

    def _quarantine_unless_used(self, key: str, seen: bytes | None = None) -> None:
        """Move blob ``key`` aside unless its bytes verify for a record or the upload cache (best effort on
        a disk that cannot be written: the caller's error stands, and the blob is tried again next time)."""
        try:
            with self.cache.lock(key), self._locked() as index:
                data = self.store.read(key)
                if data is None or (seen is not None and data != seen):
                    return  # gone, or replaced since the caller looked
                sha = sha256_hex(data)
                if sha in self._users(index, key) and problem(data, sha) is None:
                    return  # another voice's good blob: the caller's sha256 is the stale one
                self.cache.forget(sha)
                self.store.quarantine(key, seen=data)
                self._drop_pointer(index, key, sha)
        except _STORAGE_ERRORS as exc:
            log.warning("latent blob %s not quarantined: %s", key[:12], exc)

    def _drop_orphan(self, key: str) -> None:
        with self.cache.lock(key), self._locked() as index:
            if self._pointer(index, key) is not None or any(r.latents_key == key for r in self._records(index)):
                return  # used again since check looked
            sha = self.store.sha256_of(key)
            if sha is not None:
                self.cache.forget(sha)
            self.store.delete(key)

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        """Best effort: a read that found bad latents answers `VoiceBroken` whether or not this is stored."""
        self.cache.forget(record.latents_sha256)
        try:
            with self._locked() as index:
                current = index.get(f"voice:{record.name}")
                if isinstance(current, bytes):
                    fresh = VoiceRecord.from_json(current)
                    if fresh.latents_sha256 == record.latents_sha256 and fresh.status != "broken":
                        fresh.status = "broken"
                        fresh.extra["broken_reason"] = detail
                        data = fresh.to_json()
                        self.record_files.write(record.name, data)
                        index.set(f"voice:{record.name}", data)
        except (*_STORAGE_ERRORS, RegistryUnavailable) as exc:
            log.warning("voice %s not marked broken: %s", record.name, exc)
        log.error("voice %s marked broken: %s", record.name, detail)


def _unreadable(name: str) -> VoiceRecord:
    """Stands in for a record the index holds but cannot parse (so that it can be deleted)."""
    return VoiceRecord(name=name, engine="", language=None, description="", consent=False, licence="", model_id="",
                       model_sha256="", audio_sha256="", clip_sha256s=[], duration=0.0, created_at="",
                       latents_key="0" * 64, latents_sha256="", status="broken")


def _pointer_json(sha256: str) -> bytes:
    return json.dumps({"latents_sha256": sha256, "used": time.time()}, sort_keys=True).encode()


# -- rebuild ------------------------------------------------------------------------------------------------------
def rebuild_index(data_dir: Path) -> dict[str, Any]:
    """Rebuild ``<data_dir>/voices/index`` from what is on disk; the old index (if any) is moved aside.

    Presets come from the record files (``voices/records/<name>.json``) and, for names without one (data from
    before record files), from whatever rows of the old index can still be read. Every blob is verified
    (sha256, safetensors, its metadata against its key): an intact blob becomes an upload-cache entry, a bad
    one is quarantined (never deleted); a preset whose blob is missing or does not match its record is kept,
    marked broken, so that it is listed and can be deleted and registered again.

    Crash-safe: the new index is built beside the old one and swapped in by renames at the end, under the
    commit lock; a crash before the swap changes nothing that matters, and the command can simply be run again.
    Deterministic: the same files give the same index (records byte for byte; upload-cache recency from the
    blobs' modification times).

    Returns a report: ``index``, ``moved_aside``, ``voices``, ``broken``, ``salvaged`` (names found only in the
    old index), ``blobs`` (intact), ``upload_cache`` (intact blobs no preset uses), ``quarantined``,
    ``unreadable_records``, ``temp_files``.
    """
    root = data_dir / "voices"
    root.mkdir(parents=True, exist_ok=True)
    return _rebuild(data_dir, _CommitLock(root / ".lock"))


def _rebuild(data_dir: Path, lock: _CommitLock) -> dict[str, Any]:
    """`rebuild_index` under ``lock`` (a registry rebuilding at start passes its own: flock is per open file,
    so a second lock on the same file in this process would wait for the first forever)."""
    root = data_dir / "voices"
    index_dir = root / "index"
    store = LatentStore(root / "blobs")
    files = RecordFiles(root / "records")
    report: dict[str, Any] = {"index": str(index_dir), "moved_aside": None, "voices": [], "broken": [],
                              "salvaged": [], "blobs": 0, "upload_cache": 0, "quarantined": [],
                              "unreadable_records": [], "temp_files": []}
    with lock:
        for leftover in sorted(root.glob("index.rebuilding-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        for tmp in store.temp_files() + files.temp_files():
            report["temp_files"].append(str(tmp))
            tmp.unlink(missing_ok=True)

        # 1. Presets: record files first; the old index's readable rows for names that have none.
        records: dict[str, VoiceRecord] = {}
        for name in files.names():
            record = _record_file(files, name)
            if record is None:
                report["unreadable_records"].append(name)
                _quarantine_file(files.path(name), store.quarantine_dir / "records")
                continue
            records[name] = record
        for name, record in _salvage(index_dir / _INDEX_DB):
            if name not in records:
                records[name] = record
                report["salvaged"].append(name)

        # 2. Blobs: verify every one; intact ones are upload-cache entries, bad ones go to quarantine.
        pointers: dict[str, tuple[str, float]] = {}
        for key in store.keys():
            data = store.read(key)
            if data is None:
                continue
            sha = sha256_hex(data)
            meta = read_metadata(data)
            fault = problem(data, sha)
            if fault is None and all(k in meta for k in ("audio_sha256", "engine", "model_sha256")) and \
                    latents_key(meta["audio_sha256"], meta["engine"], meta["model_sha256"]) != key:
                fault = "its metadata names another origin than its key"
            if fault is not None:
                target = store.quarantine(key, seen=data)
                if target is not None:
                    report["quarantined"].append(str(target))
                continue
            pointers[key] = (sha, store.mtime_ns(key) / 1e9)

        # 3. Each preset against its blob.
        for name in sorted(records):
            record = records[name]
            entry = pointers.get(record.latents_key)
            if entry is None or entry[0] != record.latents_sha256:
                fault = "blob is missing" if entry is None else "blob does not match its recorded sha256"
                if record.status != "broken":
                    record.status = "broken"
                    record.extra["broken_reason"] = f"found by a rebuild of the index: {fault}"
            if record.status == "broken":
                report["broken"].append(name)
            report["voices"].append(name)
        # A blob that verifies as a file but is not what any of its presets recorded has changed on disk
        # (bit rot): it is quarantined like any blob a read finds bad, not kept as an upload-cache entry.
        wanted: dict[str, set[str]] = {}
        for record in records.values():
            wanted.setdefault(record.latents_key, set()).add(record.latents_sha256)
        for key, shas in sorted(wanted.items()):
            entry = pointers.get(key)
            if entry is not None and entry[0] not in shas:
                target = store.quarantine(key)
                if target is not None:
                    report["quarantined"].append(str(target))
                del pointers[key]
        report["blobs"] = len(pointers)
        report["upload_cache"] = len(set(pointers) - {r.latents_key for r in records.values()})

        # 4. The new index beside the old one, then the record files and the id, then the swap.
        index_id = uuid.uuid4().hex
        building = root / f"index.rebuilding-{os.getpid()}-{time.time_ns()}"
        new = _index_cache(building)
        try:
            new.set(_INDEX_ID, index_id.encode())
            for name in sorted(records):
                new.set(f"voice:{name}", records[name].to_json())
            for key, (sha, used) in sorted(pointers.items()):
                new.set(f"audio:{key}", json.dumps({"latents_sha256": sha, "used": used}, sort_keys=True).encode())
        finally:
            new.close()
        for name in sorted(records):
            data = records[name].to_json()
            if files.read(name) != data:
                files.write(name, data)
        files.write_id(index_id)
        if index_dir.exists():
            aside = root / f"index.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{time.time_ns() % 10**6}"
            os.replace(index_dir, aside)
            report["moved_aside"] = str(aside)
        os.replace(building, index_dir)
        fsync_dir(root)
    log.warning("%s", _rebuild_summary(report))
    return report


def _rebuild_summary(report: dict[str, Any]) -> str:
    """One line saying what a rebuild recovered (for the log): the presets by name, the broken ones, the rest."""
    def names(found: list[str]) -> str:
        shown = ", ".join(found[:20])
        return f" ({shown}{', …' if len(found) > 20 else ''})" if found else ""

    broken = report["broken"]
    intact = [name for name in report["voices"] if name not in broken]
    parts = [f"{len(intact)} preset(s) recovered{names(intact)}"]
    if broken:
        parts.append(f"{len(broken)} broken{names(broken)} (delete and register them again)")
    parts.append(f"{report['upload_cache']} upload-cache entries, {len(report['quarantined'])} blob(s) quarantined")
    aside = report["moved_aside"]
    return (f"voice index {report['index']} rebuilt from the record files and latent blobs: {', '.join(parts)}; "
            + (f"the old index was moved to {aside}" if aside else "there was no old index"))


def _record_file(files: RecordFiles, name: str) -> VoiceRecord | None:
    data = files.read(name)
    if data is None:
        return None
    try:
        record = VoiceRecord.from_json(data)
    except (ValueError, TypeError):
        return None
    if record.name != name or not isinstance(record.latents_key, str) or len(record.latents_key) != 64:
        return None
    return record


def _salvage(db: Path) -> Iterator[tuple[str, VoiceRecord]]:
    """Presets still readable in a (possibly damaged) old index; reading stops at the first damaged page."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return
    try:
        rows = con.execute("SELECT key, value FROM Cache WHERE key LIKE 'voice:%'")
        while True:
            try:
                row = rows.fetchone()
            except sqlite3.Error:
                break
            if row is None:
                break
            key, value = row
            if not isinstance(key, str) or not isinstance(value, bytes):
                continue
            name = key.removeprefix("voice:")
            try:
                record = VoiceRecord.from_json(value)
            except (ValueError, TypeError):
                continue
            if record.name == name and valid_voice_name(name):
                yield name, record
    except sqlite3.Error:
        return
    finally:
        con.close()


def _quarantine_file(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, directory / f"{path.name}.{time.time_ns()}")
