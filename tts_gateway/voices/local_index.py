"""The local registry's index: its SQLite file (diskcache), the commit lock, and whether it can serve.

The index (``<data_dir>/voices/index``, eviction off) holds JSON bytes:
  voice:<name>  → the `VoiceRecord`, byte for byte what ``records/<name>.json`` holds
  audio:<key>   → {"latents_sha256", "used"} (the upload cache)
  meta:index_id → the id ``records/.index-id`` must hold

`LocalIndex` opens it (creating it for a new data directory), reopens it when a rebuild replaced the file, and
while it cannot (damaged, missing, replaced, or a disk that cannot be used) holds the reason: every call then
raises `RegistryUnavailable` naming it, and `health` reports it. The functions below read and write the
entries of an open index.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import diskcache

from tts_gateway.errors import TTSGatewayError
from tts_gateway.voices.registry import RegistryUnavailable, VoiceRecord
from tts_gateway.voices.store import LatentStore, RecordFiles, StorageUnavailable, storage_error

log = logging.getLogger(__name__)

REBUILD_COMMAND = "tts-gateway registry rebuild"
INDEX_ID = "meta:index_id"
INDEX_DB = "cache.db"
STORAGE_ERRORS = (OSError, sqlite3.Error)
_RETRY_S = 2.0  # how soon an index that could not be opened for an environmental reason is tried again


def index_cache(directory: Path) -> diskcache.Cache:
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


class CommitLock:
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


class LocalIndex:
    """The index of the registry in ``root`` (``<data_dir>/voices``), opened lazily and reopened when replaced.

    Lock order: the commit lock before ``_state``, never the other way round.
    """

    def __init__(self, data_dir: Path, root: Path, *, store: LatentStore, record_files: RecordFiles) -> None:
        self.data_dir = data_dir
        self.root = root
        self.db = root / "index" / INDEX_DB
        self.store = store
        self.record_files = record_files
        self.commit = CommitLock(root / ".lock")
        self._state = threading.RLock()  # guards the index handle and the problem below
        self._index: diskcache.Cache | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open index file
        self._problem: str | None = None  # why the registry cannot serve, while it cannot
        self._problem_code = "registry-damaged"
        self._damaged = False  # the index's content is bad: it is opened again only once the file is replaced
        self._damage = ""  # what is wrong with the index's content, while it is damaged
        self._damaged_identity: tuple[int, int] | None = None
        self._retry_at = 0.0

    def open(self, rebuild: Callable[[CommitLock], object] | None) -> None:
        """Open the index at start. One found damaged, missing or replaced is handed to ``rebuild`` (under the
        commit lock) and opened again; without ``rebuild``, or when it fails, the reason is logged once and
        the registry is unavailable. Never raises."""
        try:
            with self.commit, self._state:
                self._open_index(announce=False)
                if self._damaged and rebuild is not None:
                    self._rebuild_at_start(rebuild)
                elif self._problem is not None:
                    log.error("voice registry unavailable: %s", self._problem)
        except OSError as exc:  # not even the lock file can be made: the data directory is unusable
            with self._state:
                self._set_problem(*self._cannot_open(exc), damaged=False)

    def close(self) -> None:
        with self._state:
            index, self._index = self._index, None
            if index is not None:
                index.close()

    def health(self) -> str | None:
        """None while presets can be read, else why not (the file and the recovery step; one line)."""
        try:
            with self.guard():
                self.ready().get(INDEX_ID)
        except TTSGatewayError as exc:
            return exc.detail
        return None

    def ready(self) -> diskcache.Cache:
        """The open index, reopened when it was replaced (a rebuild) or an earlier failure may have passed;
        `RegistryUnavailable` while it is damaged, missing or cannot be opened."""
        with self._state:
            identity = self._file_identity()
            if self._index is not None and identity == self._identity:
                return self._index
            if self._index is None and self._problem is not None:
                replaced = self._damaged and identity != self._damaged_identity
                if not replaced and time.monotonic() < self._retry_at:
                    raise self._unavailable()
        with self.commit, self._state:
            if self._index is None or self._file_identity() != self._identity:
                self._open_index()
            if self._index is None:
                raise self._unavailable()
            return self._index

    @contextmanager
    def locked(self) -> Iterator[diskcache.Cache]:
        """The commit lock, and the index as it is under it (a rebuild may have replaced it meanwhile)."""
        with self.commit:
            yield self.ready()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Storage and index failures as `RegistryUnavailable` (503) naming the cause, never a 500."""
        try:
            yield
        except TTSGatewayError:
            raise
        except STORAGE_ERRORS as exc:
            raise self._failure(exc) from None

    def sync_record_files(self, index: diskcache.Cache, *, remove_stale: bool) -> list[str]:
        """Write the record file of every indexed preset that lacks an up-to-date one; returns the names of
        record files the index does not know (removed when ``remove_stale``). Caller holds the commit lock."""
        indexed = dict(raw_records(index))
        for name, data in indexed.items():
            if self.record_files.read(name) != data:
                self.record_files.write(name, data)
        stale = [name for name in self.record_files.names() if name not in indexed]
        if remove_stale:
            for name in stale:
                self.record_files.delete(name)
        return stale

    # -- internals ----------------------------------------------------------------------------------
    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.db)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _unavailable(self) -> RegistryUnavailable:
        detail = self._problem or "the voice registry cannot be opened"
        if self._problem_code.startswith("storage"):
            return StorageUnavailable(detail, code=self._problem_code)
        return RegistryUnavailable(detail, code=self._problem_code, retry_after=30)

    def _cannot_open(self, exc: BaseException) -> tuple[str, str]:
        """(detail, code) of an index that cannot be opened for a reason other than its content."""
        translated = storage_error(exc, self.data_dir)
        if translated is None:
            return f"the voice index {self.db} cannot be opened: {exc}", "storage-error"
        return f"{translated.detail} (the voice index {self.db} cannot be opened)", translated.code

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
        detail = (f"the voice index {self.db} is {why}; presets cannot be used until it is rebuilt — run "
                  f"`{REBUILD_COMMAND}` (built-in voices keep working)")
        self._set_problem(detail, damaged=True, announce=announce)
        self._damage = why

    def _open_index(self, *, announce: bool = True) -> None:
        """Open the index (create it for a new data directory). Caller holds the commit lock and ``_state``.
        On failure the registry is unavailable, with the reason (logged when ``announce``); nothing on disk is
        changed."""
        if self._index is not None:
            old, self._index = self._index, None
            try:
                old.close()
            except STORAGE_ERRORS:
                pass
        identity = self._file_identity()
        try:
            missing = identity is None or self.db.stat().st_size == 0
            if missing and (self.record_files.any() or bool(self.store.keys())):
                self._set_damaged("missing" if identity is None else "empty", announce=announce)
                return
            if not missing:
                _quick_check(self.db)
            index = index_cache(self.db.parent)
            try:
                belongs = self._claim(index, fresh=missing)
            except BaseException:
                index.close()
                raise
            if belongs is not None:
                index.close()
                self._set_damaged(belongs, announce=announce)
                return
        except STORAGE_ERRORS as exc:
            if _is_damage(exc):
                self._set_damaged(f"damaged ({exc})", announce=announce)
                return
            self._set_problem(*self._cannot_open(exc), damaged=False, announce=announce)
            return
        if self._problem is not None:
            log.warning("voice registry available again (%s)", self.db)
        self._index, self._identity, self._problem, self._damaged = index, self._file_identity(), None, False

    def _rebuild_at_start(self, rebuild: Callable[[CommitLock], object]) -> None:
        """Replace the damaged index by one rebuilt from the record files and blobs (under the commit lock,
        which the caller holds with ``_state``). The index is derived data, so nothing waits for an operator;
        if the rebuild fails (a read-only or full disk), the registry stays unavailable and says why."""
        log.warning("voice index %s is %s: rebuilding it from the record files and latent blobs", self.db,
                    self._damage)
        try:
            rebuild(self.commit)
        except Exception as exc:  # the built-in voices must keep working whatever went wrong
            storage = isinstance(exc, STORAGE_ERRORS)
            translated = storage_error(exc, self.data_dir) if storage else None
            reason = translated.detail if translated is not None else f"{type(exc).__name__}: {exc}"
            if not storage:
                log.exception("voice index rebuild at start failed")
            self._set_damaged(f"{self._damage}, and rebuilding it at start failed ({reason})")
            return
        self._problem = None  # recovered: the reopen below is quiet unless it fails
        self._open_index()

    def _claim(self, index: diskcache.Cache, *, fresh: bool) -> str | None:
        """Match the index with the record files (caller holds the commit lock); None when they belong
        together, else what is wrong with the index. Brings the record files up to date with it."""
        stored = index.get(INDEX_ID)
        index_id = stored.decode() if isinstance(stored, bytes) else None
        file_id = self.record_files.read_id()
        if index_id is None:
            if file_id is not None and not fresh:
                return "not the one the record files in records/ belong to (replaced?)"
            # A new data directory, or one from before record files: they are written now.
            index_id = uuid.uuid4().hex
            index.set(INDEX_ID, index_id.encode())
        elif file_id is not None and file_id != index_id:
            return "not the one the record files in records/ belong to (replaced?)"
        try:
            self.sync_record_files(index, remove_stale=False)  # extra files: `check --fix` decides
            if file_id != index_id:
                self.record_files.write_id(index_id)
        except STORAGE_ERRORS as exc:  # a read-only or full disk: the files catch up at a later open
            log.warning("voice record files not brought up to date: %s", exc)
        return None

    def _failure(self, exc: BaseException) -> RegistryUnavailable:
        if _is_damage(exc):
            with self._state:
                self._set_damaged(f"damaged ({exc})")
                index, self._index = self._index, None
                if index is not None:
                    try:
                        index.close()
                    except STORAGE_ERRORS:
                        pass
                return self._unavailable()
        translated = storage_error(exc, self.data_dir)
        if translated is not None:
            return translated
        return StorageUnavailable(f"the voice registry in {self.root} failed: {exc}", code="storage-error")


def _quick_check(db: Path) -> None:
    """Raise `sqlite3.DatabaseError` when SQLite finds the file damaged (cheap: the index is small)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
    finally:
        con.close()
    if rows != [("ok",)]:
        raise sqlite3.DatabaseError(f"database disk image is malformed: {rows[0][0] if rows else '?'}")


# -- the entries of an open index ------------------------------------------------------------------------------
def raw_records(index: diskcache.Cache) -> Iterator[tuple[str, bytes]]:
    for key in index.iterkeys():
        if isinstance(key, str) and key.startswith("voice:"):
            data = index.get(key)
            if isinstance(data, bytes):
                yield key.removeprefix("voice:"), data


def parse_record(name: str, data: bytes) -> VoiceRecord | None:
    try:
        return VoiceRecord.from_json(data)
    except (ValueError, TypeError) as exc:
        log.error("voice %s: its record in the index is unreadable (%s)", name, exc)
        return None


def index_records(index: diskcache.Cache) -> list[VoiceRecord]:
    """Every readable preset, sorted by name."""
    found = (parse_record(name, data) for name, data in raw_records(index))
    return sorted((r for r in found if r is not None), key=lambda r: r.name)


def pointer(index: diskcache.Cache, key: str) -> str | None:
    """The blob sha256 of upload-cache entry ``key``, if there is one."""
    data = index.get(f"audio:{key}")
    return str(json.loads(data)["latents_sha256"]) if isinstance(data, bytes) else None


def pointer_json(sha256: str) -> bytes:
    return json.dumps({"latents_sha256": sha256, "used": time.time()}, sort_keys=True).encode()


def pointer_entries(index: diskcache.Cache) -> dict[str, tuple[str, float]]:
    """Every upload-cache entry: key → (blob sha256, when last used)."""
    found = {}
    for name in index.iterkeys():
        if isinstance(name, str) and name.startswith("audio:"):
            data = index.get(name)
            if isinstance(data, bytes):
                value = json.loads(data)
                found[name.removeprefix("audio:")] = (str(value["latents_sha256"]), float(value.get("used", 0)))
    return found


def set_pointer(index: diskcache.Cache, key: str, sha256: str) -> None:
    if pointer(index, key) != sha256:
        index.set(f"audio:{key}", pointer_json(sha256))


def drop_pointer(index: diskcache.Cache, key: str, sha256: str) -> None:
    if pointer(index, key) == sha256:
        index.delete(f"audio:{key}")


def blob_users(index: diskcache.Cache, key: str) -> set[str]:
    """The sha256s that records and the upload cache expect of blob ``key``."""
    users = {r.latents_sha256 for r in index_records(index) if r.latents_key == key}
    found = pointer(index, key)
    if found is not None:
        users.add(found)
    return users
