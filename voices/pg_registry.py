"""PostgresVoiceRegistry: the voice registry with PostgreSQL as the source of truth (``TTS_GATEWAY_REGISTRY_URL``).

Several gateway processes share one database; each keeps a local read-through cache of blobs.

Schema (created on first use, under an advisory lock so that nodes starting together do not race):

  tts_voice_blobs   sha256 text PK, data bytea — CHECK (sha256 = encode(sha256(data), 'hex')): the database
                    itself refuses bytes that do not match their name.
  tts_voices        name text PK (the unique name: of two racing creators exactly one INSERT wins),
                    latents_key, latents_sha256 → tts_voice_blobs, record jsonb (the `VoiceRecord`).
  tts_conditioning  key text PK (= latents_key(audio, engine, model)) → latents_sha256: the upload cache of
                    the old ``/synthesize`` call, shared by every node.

Blobs are referenced by foreign keys, so one still used by a voice or by the upload cache cannot be deleted;
a blob is removed in the same transaction that drops its last reference.

Local cache: ``<data_dir>/voices/pg-cache/blobs/<sha[:2]>/<sha>.safetensors`` (a `LatentStore` keyed by the
blob's sha256). Every read verifies the file's sha256; a corrupt file is quarantined and the blob fetched
again from PostgreSQL, never served. No pickle anywhere: latents are safetensors, records are JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tts_gateway.voices.names import VOICE_NAME_RE
from tts_gateway.errors import InvalidField, Unavailable
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.registry import (
    ComputeLatents,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
    latents_key,
)
from tts_gateway.voices.store import CorruptBlob, LatentStore, atomic_write

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MIN_SERVER_VERSION = 110000  # sha256(bytea) arrived in PostgreSQL 11
_SCHEMA_LOCK = 0x7474_7376_6F69_6365  # "ttsvoice": the pg_advisory_xact_lock key of schema set-up
_IDLE_PING_S = 5.0
_RUNTIME_CONNECT_TIMEOUT_S = 5
_ROLLBACK = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)  # retried

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tts_registry_schema (version integer NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tts_voice_blobs (
        sha256 text PRIMARY KEY,
        data bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT tts_voice_blobs_sha256_matches CHECK (sha256 = encode(sha256(data), 'hex'))
    )""",
    """CREATE TABLE IF NOT EXISTS tts_voices (
        name text PRIMARY KEY CONSTRAINT tts_voices_name_length CHECK (char_length(name) BETWEEN 1 AND 65),
        latents_key text NOT NULL CONSTRAINT tts_voices_key_hex CHECK (latents_key ~ '^[0-9a-f]{64}$'),
        latents_sha256 text NOT NULL REFERENCES tts_voice_blobs (sha256),
        record jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT tts_voices_record_matches CHECK (
            jsonb_typeof(record) = 'object' AND record->>'name' = name
            AND record->>'latents_key' = latents_key AND record->>'latents_sha256' = latents_sha256)
    )""",
    """CREATE INDEX IF NOT EXISTS tts_voices_latents_sha256 ON tts_voices (latents_sha256)""",
    """CREATE INDEX IF NOT EXISTS tts_voices_latents_key ON tts_voices (latents_key)""",
    """CREATE TABLE IF NOT EXISTS tts_conditioning (
        key text PRIMARY KEY CONSTRAINT tts_conditioning_key_hex CHECK (key ~ '^[0-9a-f]{64}$'),
        latents_sha256 text NOT NULL REFERENCES tts_voice_blobs (sha256),
        engine text NOT NULL,
        model_sha256 text NOT NULL,
        audio_sha256 text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE INDEX IF NOT EXISTS tts_conditioning_latents_sha256 ON tts_conditioning (latents_sha256)""",
)

Connection = psycopg.Connection[Any]
T = TypeVar("T")


class RegistryUnavailable(Unavailable):
    """The registry database cannot be reached right now (HTTP 503 with Retry-After)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the voice registry database is unavailable: {detail}", retry_after=5,
                         code="registry-unavailable")


class RegistryConnectError(Unavailable):
    """The registry database could not be reached or set up at start (the CLI reports it and exits)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="registry-unavailable")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "postgresql://…"


def serialize(latents: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The same safetensors bytes `LatentStore.put` writes."""
    return st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in latents.items()}, metadata=metadata)


class _Pool:
    """A small thread-safe pool of autocommit connections (multi-statement work uses ``conn.transaction()``)."""

    def __init__(self, url: str, size: int, connect_timeout: int) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._idle: queue.LifoQueue[tuple[Connection, float]] = queue.LifoQueue(maxsize=size)
        self._closed = False

    def connect(self) -> Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(2, self.connect_timeout),
                               application_name="tts-gateway")

    def _take(self) -> Connection:
        while True:
            try:
                conn, since = self._idle.get_nowait()
            except queue.Empty:
                return self.connect()
            if conn.closed or conn.broken:
                conn.close()
                continue
            if time.monotonic() - since > _IDLE_PING_S:  # the server may have restarted meanwhile
                try:
                    conn.execute("SELECT 1")
                except psycopg.Error:
                    conn.close()
                    continue
            return conn

    def _give(self, conn: Connection) -> None:
        if conn.broken:  # the server went away or restarted: its siblings are as dead, drop them all
            self._drain()
        ok = not (conn.closed or conn.broken) and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if ok and not self._closed:
            try:
                self._idle.put_nowait((conn, time.monotonic()))
                return
            except queue.Full:
                pass
        conn.close()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        conn = self._take()
        try:
            yield conn
        finally:
            self._give(conn)

    def close(self) -> None:
        self._closed = True
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                conn, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            conn.close()


class PostgresVoiceRegistry(VoiceRegistry):
    """`VoiceRegistry` over PostgreSQL: same methods, same exceptions, shared by every node.

    It subclasses `VoiceRegistry` for its type (the service and the gateway accept either) and
    overrides every method; none of the diskcache machinery is used.

    Args:
        data_dir: The gateway's data directory (holds this node's blob cache).
        url: ``postgresql://user:password@host:port/database``.
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
        pool_size: Idle connections kept open.
        connect_timeout: Seconds to keep trying to reach the database at start.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        url: str,
        on_conditioning: Callable[[str], None] = lambda engine: None,
        on_cache_hit: Callable[[str], None] = lambda engine: None,
        memory_entries: int = 64,
        pool_size: int = 8,
        connect_timeout: float = 15.0,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("the registry URL must start with postgresql:// or postgres://")
        self.url = url
        self.root = data_dir / "voices" / "pg-cache"
        self.store = LatentStore(self.root / "blobs")  # keyed by blob sha256
        self._on_conditioning = on_conditioning
        self._on_cache_hit = on_cache_hit
        self._lock = threading.RLock()  # orders this node's cache writes and deletes
        self._memory: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._memory_entries = memory_entries
        self._memory_lock = threading.Lock()
        self._pool = _Pool(url, pool_size, _RUNTIME_CONNECT_TIMEOUT_S)
        self._setup(connect_timeout)

    def __repr__(self) -> str:
        return f"PostgresVoiceRegistry({redact(self.url)!r})"

    def _setup(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                with self._pool.connection() as conn:
                    self._migrate(conn)
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise RegistryConnectError(
                        f"cannot reach the voice registry database TTS_GATEWAY_REGISTRY_URL={redact(self.url)}: "
                        f"{_first_line(exc)}") from None
                log.warning("registry database not reachable yet (%s); retrying", _first_line(exc))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except psycopg.Error as exc:
                raise RegistryConnectError(
                    f"cannot set up the voice registry in TTS_GATEWAY_REGISTRY_URL={redact(self.url)}: "
                    f"{_first_line(exc)}") from None

    @staticmethod
    def _migrate(conn: Connection) -> None:
        version = conn.info.server_version
        if version < MIN_SERVER_VERSION:
            raise RegistryConnectError(
                f"TTS_GATEWAY_REGISTRY_URL points at PostgreSQL {version // 10000}; 11 or newer is needed "
                "(sha256() on bytea)")

        def current() -> int | None:
            if conn.execute("SELECT to_regclass('tts_registry_schema')").fetchone() == (None,):
                return None
            row = conn.execute("SELECT max(version) FROM tts_registry_schema").fetchone()
            return row[0] if row else None

        found = current()  # a user with data rights only can run on a schema an admin made
        if found is None or found < SCHEMA_VERSION:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))  # nodes starting together
                for statement in SCHEMA:
                    conn.execute(statement)
                found = current()
                if found is None:
                    conn.execute("INSERT INTO tts_registry_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                    found = SCHEMA_VERSION
        if found > SCHEMA_VERSION:
            raise RegistryConnectError(
                f"the registry database has schema version {found}; this gateway knows {SCHEMA_VERSION}: "
                "upgrade the gateway")

    def close(self) -> None:
        self._pool.close()

    # -- database helpers -----------------------------------------------------------------------
    @contextmanager
    def _db(self) -> Iterator[Connection]:
        """A pooled connection; connection-level failures become `RegistryUnavailable` (503)."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except _ROLLBACK:  # deadlock, serialization: `_write` retries
            raise
        except psycopg.OperationalError as exc:
            log.warning("registry database error: %s", _first_line(exc))
            raise RegistryUnavailable(_first_line(exc)) from None

    def _write(self, work: Callable[[Connection], T], retry: tuple[type[Exception], ...] = ()) -> T:
        """Run ``work`` in one transaction; again (a few times) after a deadlock or ``retry`` errors."""
        attempts = 4
        retried: tuple[type[Exception], ...] = (*_ROLLBACK, *retry)
        for attempt in range(attempts):
            try:
                with self._db() as conn, conn.transaction():
                    return work(conn)
            except retried as exc:
                if attempt == attempts - 1:
                    if isinstance(exc, _ROLLBACK):
                        raise RegistryUnavailable(_first_line(exc)) from None
                    raise
                log.info("registry transaction retried: %s", _first_line(exc))
                time.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    def _read(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query, once more on a fresh connection if the first one failed."""
        try:
            with self._pool.connection() as conn:
                return conn.execute(query, params).fetchall()
        except psycopg.OperationalError:
            with self._db() as conn:
                return conn.execute(query, params).fetchall()

    @staticmethod
    def _record(raw: Any) -> VoiceRecord:
        data = raw if isinstance(raw, dict) else json.loads(raw)
        known = set(VoiceRecord.__dataclass_fields__)
        return VoiceRecord(**{k: v for k, v in data.items() if k in known})

    @staticmethod
    def _drop_blob_if_unreferenced(conn: Connection, sha256: str) -> bool:
        """Delete a blob nothing refers to; inside the caller's transaction. True when it went."""
        try:
            with conn.transaction():  # a savepoint: a reference committed meanwhile must not abort the caller
                cur = conn.execute(
                    "DELETE FROM tts_voice_blobs b WHERE b.sha256 = %s"
                    " AND NOT EXISTS (SELECT 1 FROM tts_voices v WHERE v.latents_sha256 = b.sha256)"
                    " AND NOT EXISTS (SELECT 1 FROM tts_conditioning c WHERE c.latents_sha256 = b.sha256)",
                    (sha256,))
                return cur.rowcount > 0
        except psycopg.errors.ForeignKeyViolation:
            return False

    @staticmethod
    def _ensure_blob(conn: Connection, sha256: str, data: bytes) -> None:
        """Make the blob exist and lock it against deletion until the caller's transaction ends."""
        if conn.execute("SELECT 1 FROM tts_voice_blobs WHERE sha256 = %s FOR KEY SHARE", (sha256,)).fetchone():
            return
        conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s) ON CONFLICT (sha256) DO NOTHING",
                     (sha256, data))

    # -- reading --------------------------------------------------------------------------------
    def get(self, name: str) -> VoiceRecord:
        if not VOICE_NAME_RE.fullmatch(name):
            raise VoiceNotFound(name)
        rows = self._read("SELECT record FROM tts_voices WHERE name = %s", (name,))
        if not rows:
            raise VoiceNotFound(name)
        return self._record(rows[0][0])

    def exists(self, name: str) -> bool:
        return bool(VOICE_NAME_RE.fullmatch(name)) and bool(
            self._read("SELECT 1 FROM tts_voices WHERE name = %s", (name,)))

    def records(self) -> list[VoiceRecord]:
        return [self._record(row[0]) for row in self._read("SELECT record FROM tts_voices ORDER BY name")]

    def latents(self, record: VoiceRecord) -> dict[str, np.ndarray]:
        """Verified latents of a preset; never recomputes. Raises `VoiceBroken`."""
        try:
            return self._load(record.latents_key, record.latents_sha256)
        except CorruptBlob as exc:
            self._mark_broken(record, str(exc))
            raise VoiceBroken(record.name, str(exc)) from None

    def _load(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """Memory, then the local cache (verified), then PostgreSQL; raises `CorruptBlob` only when
        the database's own copy is missing or unreadable (a bad local file is just fetched again)."""
        with self._memory_lock:
            cached = self._memory.get(sha256)
            if cached is not None:
                self._memory.move_to_end(sha256)
                return cached
        latents = self._load_local(sha256)
        if latents is None:
            latents = self._fetch(sha256)
        with self._memory_lock:
            self._memory[sha256] = latents
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)
        return latents

    def _load_local(self, sha256: str) -> dict[str, np.ndarray] | None:
        if not self.store.exists(sha256):
            return None
        try:
            return self.store.get(sha256, sha256)  # verifies; quarantines a bad file
        except CorruptBlob as exc:
            log.warning("local blob cache: %s; fetching it again from PostgreSQL", exc)
            return None

    def _fetch(self, sha256: str) -> dict[str, np.ndarray]:
        rows = self._read("SELECT data FROM tts_voice_blobs WHERE sha256 = %s", (sha256,))
        if not rows:
            raise CorruptBlob(sha256, "blob is missing from the registry database")
        data = bytes(rows[0][0])
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:  # the CHECK constraint makes this impossible; never trust it blindly
            raise CorruptBlob(sha256, f"database copy has sha256 {actual[:12]}…")
        try:
            latents = dict(st_load(data))
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise CorruptBlob(sha256, f"not a safetensors file: {exc}") from None
        self._cache_locally(sha256, data)
        return latents

    def _cache_locally(self, sha256: str, data: bytes) -> None:
        try:
            with self._lock:
                atomic_write(self.store.path(sha256), data)
        except OSError as exc:  # a full or read-only disk only costs the cache
            log.warning("could not write the local blob cache: %s", exc)

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        self._forget(record.latents_sha256)
        self._write(lambda conn: conn.execute(
            "UPDATE tts_voices SET record = record || jsonb_build_object('status', 'broken', 'extra',"
            " coalesce(record->'extra', '{}'::jsonb) || jsonb_build_object('broken_reason', %s::text))"
            " WHERE name = %s AND latents_sha256 = %s AND record->>'status' IS DISTINCT FROM 'broken'",
            (detail, record.name, record.latents_sha256)))
        log.error("voice %s marked broken: %s", record.name, detail)

    # -- conditioning ---------------------------------------------------------------------------
    def condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Latents for this audio on this engine and model: stored ones (any node's) if any, else computed once.

        Returns (blob key, blob sha256, latents).
        """
        key, sha, latents, _data = self._condition(reference, engine, model_sha256, compute)
        return key, sha, latents

    def _condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray], bytes | None]:
        key = latents_key(reference.sha256, engine, model_sha256)
        rows = self._read("SELECT latents_sha256 FROM tts_conditioning WHERE key = %s", (key,))
        if rows:
            sha = rows[0][0]
            try:
                latents = self._load(key, sha)
                self._on_cache_hit(engine)
                return key, sha, latents, None
            except CorruptBlob as exc:
                log.warning("recomputing latents: %s", exc)

                def forget(conn: Connection) -> None:
                    conn.execute("DELETE FROM tts_conditioning WHERE key = %s AND latents_sha256 = %s", (key, sha))
                    self._drop_blob_if_unreferenced(conn, sha)

                self._write(forget)
        latents = compute(reference.samples)
        self._on_conditioning(engine)
        data = serialize(latents, {"engine": engine, "model_sha256": model_sha256,
                                   "audio_sha256": reference.sha256})
        sha = hashlib.sha256(data).hexdigest()

        def store(conn: Connection) -> None:
            self._ensure_blob(conn, sha, data)
            old = conn.execute("SELECT latents_sha256 FROM tts_conditioning WHERE key = %s FOR UPDATE",
                               (key,)).fetchone()
            conn.execute(
                "INSERT INTO tts_conditioning (key, latents_sha256, engine, model_sha256, audio_sha256)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET latents_sha256 = EXCLUDED.latents_sha256",
                (key, sha, engine, model_sha256, reference.sha256))
            if old is not None and old[0] != sha:
                self._drop_blob_if_unreferenced(conn, old[0])

        self._write(store, retry=(psycopg.errors.ForeignKeyViolation,))
        self._cache_locally(sha, data)
        with self._memory_lock:
            self._memory[sha] = latents
        return key, sha, latents, data

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
        """Register a preset; raises `VoiceExists` if the name is taken (the database's unique key decides)."""
        if not VOICE_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid voice name {name!r}")
        for field_name, value in (("description", description), ("language", language), ("engine", engine),
                                  ("licence", licence), ("model_id", model_id)):
            if value is not None and not _storable(value):  # checked before the latents are computed
                raise InvalidField(field_name, "must not contain NUL characters or lone surrogates")
        if self.exists(name):
            raise VoiceExists(name)
        key, sha, latents, data = self._condition(reference, engine, model_sha256, compute)
        record = VoiceRecord.new(name, reference, latents_key=key, latents_sha256=sha, engine=engine,
                                 language=language, description=description, consent=consent, licence=licence,
                                 model_id=model_id, model_sha256=model_sha256)
        blob: list[bytes | None] = [data]

        def insert(conn: Connection) -> None:
            present = conn.execute("SELECT 1 FROM tts_voice_blobs WHERE sha256 = %s FOR KEY SHARE",
                                   (record.latents_sha256,)).fetchone()
            if not present:  # removed since conditioning (its last user deleted): store it again
                again = blob[0] or serialize(latents, {"engine": engine, "model_sha256": model_sha256,
                                                       "audio_sha256": reference.sha256})
                blob[0] = again
                record.latents_sha256 = hashlib.sha256(again).hexdigest()
                self._ensure_blob(conn, record.latents_sha256, again)
            # The primary key decides: of two racing creators (any nodes) exactly one INSERT wins.
            inserted = conn.execute(
                "INSERT INTO tts_voices (name, latents_key, latents_sha256, record) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, key, record.latents_sha256, Jsonb(asdict(record)))).fetchone()
            if inserted is None:
                raise VoiceExists(name)

        self._write(insert, retry=(psycopg.errors.ForeignKeyViolation,))
        data = blob[0]
        if data is not None and record.latents_sha256 != sha:
            self._cache_locally(record.latents_sha256, data)
        return record

    def delete(self, name: str) -> VoiceRecord:
        if not VOICE_NAME_RE.fullmatch(name):
            raise VoiceNotFound(name)

        def remove(conn: Connection) -> tuple[VoiceRecord, list[str]]:
            row = conn.execute("DELETE FROM tts_voices WHERE name = %s RETURNING record", (name,)).fetchone()
            if row is None:
                raise VoiceNotFound(name)
            record = self._record(row[0])
            # Forget the upload-cache entry unless another preset shares it (same audio registered twice),
            # then free every blob nothing refers to any more.
            candidates = {record.latents_sha256}
            if not conn.execute("SELECT 1 FROM tts_voices WHERE latents_key = %s LIMIT 1",
                                (record.latents_key,)).fetchone():
                pointers = conn.execute("DELETE FROM tts_conditioning WHERE key = %s RETURNING latents_sha256",
                                        (record.latents_key,)).fetchall()
                candidates.update(p[0] for p in pointers)
            return record, [sha for sha in sorted(candidates) if self._drop_blob_if_unreferenced(conn, sha)]

        record, dropped = self._write(remove)
        self._forget(record.latents_sha256)
        with self._lock:
            for sha in dropped:
                self._forget(sha)
                self.store.delete(sha)
        return record

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs (in the database, or ``cache:<sha>`` for stale or corrupt local
        cache files) and leftover temp files; ``fix`` marks broken voices and removes the rest."""
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        with self._lock:
            for record in self.records():
                problem = "marked broken" if record.status == "broken" else self._verify_blob(record.latents_sha256)
                if problem is None:
                    continue
                report["broken"].append(record.name)
                if fix and record.status != "broken":
                    self._mark_broken(record, problem)
            orphans = self._read(
                "SELECT b.sha256 FROM tts_voice_blobs b"
                " WHERE NOT EXISTS (SELECT 1 FROM tts_voices v WHERE v.latents_sha256 = b.sha256)"
                " AND NOT EXISTS (SELECT 1 FROM tts_conditioning c WHERE c.latents_sha256 = b.sha256)"
                " ORDER BY b.sha256")
            for (sha,) in orphans:
                report["orphans"].append(sha)
                if fix:
                    self._write(partial(self._drop_blob_if_unreferenced, sha256=sha))
            known = {row[0] for row in self._read("SELECT sha256 FROM tts_voice_blobs")}
            for sha in self.store.keys():
                if sha in known and self.store.sha256_of(sha) == sha:
                    continue
                report["orphans"].append(f"cache:{sha}")
                if fix:
                    self._forget(sha)
                    self.store.delete(sha)
            for tmp in self.store.temp_files():
                report["temp_files"].append(str(tmp))
                if fix:
                    tmp.unlink(missing_ok=True)
        return report

    def _verify_blob(self, sha256: str) -> str | None:
        """What is wrong with the database's copy of a blob, or None."""
        rows = self._read("SELECT data FROM tts_voice_blobs WHERE sha256 = %s", (sha256,))
        if not rows:
            return "blob is missing from the registry database"
        data = bytes(rows[0][0])
        if hashlib.sha256(data).hexdigest() != sha256:
            return "database copy does not match its sha256"
        try:
            st_load(data)
        except Exception as exc:
            return f"not a safetensors file: {exc}"
        return None


def _storable(text: str) -> bool:
    """Whether PostgreSQL text and jsonb can hold this string (no NUL, valid UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
