"""PostgresVoiceRegistry: the voice registry with PostgreSQL as the source of truth (``TTS_GATEWAY_REGISTRY_URL``).

Several gateway processes share one database (its tables: `tts_gateway.voices.pg_schema`; the connections:
`tts_gateway.voices.pg_database`); each keeps a local read-through cache of blobs.

Local cache: ``<data_dir>/voices/pg-cache/blobs/<sha[:2]>/<sha>.safetensors`` (a `LatentStore` keyed by the
blob's sha256). Every read verifies the file's sha256; a corrupt file is quarantined and the blob fetched
again from PostgreSQL, never served. No pickle anywhere: latents are safetensors, records are JSON.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb

from tts_gateway.errors import InvalidField
from tts_gateway.voices.blobs import CorruptBlob, encode, problem, sha256_hex
from tts_gateway.voices.cache import Latents
from tts_gateway.voices.names import valid_voice_name
from tts_gateway.voices.pg_database import Connection, Database, DatabaseUnavailable, first_line, redact
from tts_gateway.voices.pg_schema import setup
from tts_gateway.voices.registry import RegistryUnavailable, VoiceExists, VoiceNotFound, VoiceRecord
from tts_gateway.voices.registry_base import UPLOAD_CACHE_ENTRIES, Conditioned, NewVoice, RegistryBase
from tts_gateway.voices.store import storage_error

log = logging.getLogger(__name__)


class PostgresVoiceRegistry(RegistryBase):
    """`VoiceRegistry` over PostgreSQL: the same methods and exceptions as `LocalVoiceRegistry`, shared by
    every node.

    Args:
        data_dir: The gateway's data directory (holds this node's blob cache).
        url: ``postgresql://user:password@host:port/database``.
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
        upload_cache_entries: How many upload-cache rows (latents no preset uses) to keep; past that, the
            least recently used go with their blobs.
        pool_size: The most connections open at once.
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
        upload_cache_entries: int = UPLOAD_CACHE_ENTRIES,
        pool_size: int = 8,
        connect_timeout: float = 15.0,
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("the registry URL must start with postgresql:// or postgres://")
        self.url = url
        self.root = data_dir / "voices" / "pg-cache"
        super().__init__(data_dir, self.root / "blobs",  # this node's blob cache, keyed by blob sha256
                         on_conditioning=on_conditioning, on_cache_hit=on_cache_hit, memory_entries=memory_entries,
                         upload_cache_entries=upload_cache_entries)
        self._lock = threading.RLock()  # orders this node's cache file writes, quarantines and deletes
        setup(url, connect_timeout)
        self._database = Database(url, pool_size=pool_size)

    def __repr__(self) -> str:
        return f"PostgresVoiceRegistry({redact(self.url)!r})"

    def close(self) -> None:
        self._database.close()

    def health(self) -> str | None:
        """None while the database answers, else why not (waits at most a couple of seconds; never raises)."""
        return self._database.health()

    # -- records and blob rows ------------------------------------------------------------------
    @staticmethod
    def _record(raw: Any) -> VoiceRecord:
        return VoiceRecord.from_dict(raw) if isinstance(raw, dict) else VoiceRecord.from_json(raw)

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
        if not valid_voice_name(name):
            raise VoiceNotFound(name)
        rows = self._database.read("SELECT record FROM tts_voices WHERE name = %s", (name,))
        if not rows:
            raise VoiceNotFound(name)
        return self._record(rows[0][0])

    def exists(self, name: str) -> bool:
        return valid_voice_name(name) and bool(self._database.read("SELECT 1 FROM tts_voices WHERE name = %s", (name,)))

    def records(self) -> list[VoiceRecord]:
        return [self._record(row[0]) for row in self._database.read("SELECT record FROM tts_voices ORDER BY name")]

    def load_latents(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """Memory, then the local cache (verified), then PostgreSQL; raises `CorruptBlob` only when the
        database's own copy is missing or unreadable (a bad local file is just fetched again)."""
        cached = self.cache.get(sha256)
        if cached is not None:
            return cached
        data = self.store.read(sha256)
        if data is not None:
            try:
                return self.cache.verify(data, sha256)
            except CorruptBlob as exc:
                log.warning("local blob cache: %s; fetching it again from PostgreSQL", exc)
                self._local_quarantine(sha256, data)
        rows = self._database.read("SELECT data FROM tts_voice_blobs WHERE sha256 = %s", (sha256,))
        if not rows:
            raise CorruptBlob(sha256, "blob is missing from the registry database")
        data = bytes(rows[0][0])
        latents = self.cache.verify(data, sha256)  # the CHECK constraint makes a mismatch impossible; verify anyway
        self._cache_locally(sha256, data)
        return latents

    def _local_quarantine(self, sha256: str, data: bytes) -> None:
        try:
            with self._lock:  # named by its sha256: bytes that do not match it are nobody's
                self.store.quarantine(sha256, seen=data)
        except OSError as exc:  # a read-only disk: the file stays, and is verified (and refused) again
            log.warning("could not quarantine a local blob cache file: %s", exc)

    def _drop_locally(self, shas: list[str]) -> None:
        """Forget blobs that left the database; their local cache files go too (best effort)."""
        with self._lock:
            for sha in shas:
                self.cache.forget(sha)
                try:
                    self.store.delete(sha)
                except OSError as exc:
                    log.warning("local blob cache file %s… not removed (%s); `tts-gateway registry check --fix` "
                                "removes it later", sha[:12], exc)

    def _cache_locally(self, sha256: str, data: bytes) -> None:
        try:
            with self._lock:
                self.store.write(sha256, data)  # never over a file already there (it holds these bytes)
        except OSError as exc:  # a full or read-only disk only costs the cache
            log.warning("could not write the local blob cache: %s", exc)

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        self.cache.forget(record.latents_sha256)
        self._database.write(lambda conn: conn.execute(
            "UPDATE tts_voices SET record = record || jsonb_build_object('status', 'broken', 'extra',"
            " coalesce(record->'extra', '{}'::jsonb) || jsonb_build_object('broken_reason', %s::text))"
            " WHERE name = %s AND latents_sha256 = %s AND record->>'status' IS DISTINCT FROM 'broken'",
            (detail, record.name, record.latents_sha256)))
        log.error("voice %s marked broken: %s", record.name, detail)

    # -- conditioning ---------------------------------------------------------------------------
    def _store(self, key: str, meta: dict[str, str], computed: Latents, *, for_preset: bool) -> Conditioned:
        """Store the blob and the upload-cache row; across nodes the first row of a key wins."""
        data = encode(computed, meta)
        sha = sha256_hex(data)
        latents = self.cache.verify(data, sha)  # exactly what the blob holds (float32)
        origin = (meta["engine"], meta["model_sha256"], meta["audio_sha256"])

        def store(conn: Connection) -> str:
            self._ensure_blob(conn, sha, data)
            for _ in range(3):
                if conn.execute(
                    "INSERT INTO tts_conditioning (key, latents_sha256, engine, model_sha256, audio_sha256)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING RETURNING key",
                    (key, sha, *origin),
                ).fetchone():
                    return sha
                winner = conn.execute("SELECT latents_sha256 FROM tts_conditioning WHERE key = %s FOR KEY SHARE",
                                      (key,)).fetchone()
                if winner is not None:  # another node stored this audio meanwhile: its blob wins
                    if winner[0] != sha:
                        self._drop_blob_if_unreferenced(conn, sha)
                    return str(winner[0])
            raise DatabaseUnavailable("the upload cache entry kept changing")

        stored_sha = self._database.write(store, retry=(psycopg.errors.ForeignKeyViolation,))
        self._bound_upload_cache(keep=key)
        if stored_sha != sha:
            try:
                return Conditioned(key, stored_sha, self.load_latents(key, stored_sha))
            except CorruptBlob as exc:  # the winner is unusable after all: ours replaces it
                log.warning("replacing unusable upload-cache latents: %s", exc)
                self._database.write(partial(self._replace_pointer, key=key, stale=stored_sha, sha=sha, data=data,
                                    origin=origin))
        self._cache_locally(sha, data)
        return Conditioned(key, sha, latents, data)

    def _stored(self, key: str, meta: dict[str, str], *, for_preset: bool) -> Conditioned | None:
        rows = self._database.read("SELECT latents_sha256 FROM tts_conditioning WHERE key = %s", (key,))
        if not rows:
            return None
        sha = str(rows[0][0])
        try:
            latents = self.load_latents(key, sha)
        except CorruptBlob as exc:
            log.warning("recomputing latents: %s", exc)

            def forget(conn: Connection) -> None:
                conn.execute("DELETE FROM tts_conditioning WHERE key = %s AND latents_sha256 = %s", (key, sha))
                self._drop_blob_if_unreferenced(conn, sha)

            self._database.write(forget)
            return None
        self._touch(key, sha)
        return Conditioned(key, sha, latents)

    def _touch(self, key: str, sha256: str) -> None:
        """Mark an upload-cache row used now (best effort: a hit must not fail on it)."""
        try:
            with self._database.session() as conn:
                conn.execute("UPDATE tts_conditioning SET used_at = clock_timestamp()"
                             " WHERE key = %s AND latents_sha256 = %s", (key, sha256))
        except (RegistryUnavailable, psycopg.Error) as exc:
            log.debug("upload-cache use of %s not recorded: %s", key[:12], first_line(exc))

    def _bound_upload_cache(self, keep: str) -> None:
        """Past ``upload_cache_entries`` rows no preset uses, delete the least recently used ones (never
        ``keep``, nor rows another transaction has locked) and every blob that leaves unreferenced.

        Safe against concurrent use: a blob a preset or another row refers to cannot be deleted (foreign
        keys), and one a create is about to use is locked by it (FOR KEY SHARE), so that delete fails
        quietly; a node whose row went meanwhile finds no row, computes again and inserts it anew."""
        def evict(conn: Connection) -> list[str]:
            rows = conn.execute(
                "WITH victims AS ("
                " SELECT c.key FROM tts_conditioning c"
                " WHERE NOT EXISTS (SELECT 1 FROM tts_voices v WHERE v.latents_key = c.key)"
                " ORDER BY c.used_at DESC, c.key OFFSET %s FOR UPDATE OF c SKIP LOCKED)"
                " DELETE FROM tts_conditioning c USING victims WHERE c.key = victims.key AND c.key <> %s"
                " AND NOT EXISTS (SELECT 1 FROM tts_voices v WHERE v.latents_key = c.key)"
                " RETURNING c.latents_sha256",
                (self.upload_cache_entries, keep)).fetchall()
            return [sha for sha in sorted({row[0] for row in rows}) if self._drop_blob_if_unreferenced(conn, sha)]

        try:
            dropped = self._database.write(evict)
        except (RegistryUnavailable, psycopg.Error) as exc:
            log.warning("upload cache not trimmed: %s", first_line(exc))
            return
        if dropped:
            log.info("upload cache: %d least recently used entries evicted", len(dropped))
        self._drop_locally(dropped)

    def _replace_pointer(self, conn: Connection, *, key: str, stale: str, sha: str, data: bytes,
                         origin: tuple[str, str, str]) -> None:
        """Point upload-cache row ``key`` at blob ``sha`` instead of ``stale``; ``origin`` is (engine, model
        sha256, audio sha256)."""
        self._ensure_blob(conn, sha, data)
        conn.execute(
            "INSERT INTO tts_conditioning (key, latents_sha256, engine, model_sha256, audio_sha256)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET latents_sha256 = EXCLUDED.latents_sha256"
            " WHERE tts_conditioning.latents_sha256 = %s",
            (key, sha, *origin, stale))
        self._drop_blob_if_unreferenced(conn, stale)

    # -- writing --------------------------------------------------------------------------------
    def _check_text(self, field_name: str, value: str) -> None:
        if not _storable(value):
            raise InvalidField(field_name, "must not contain NUL characters or lone surrogates")

    def _insert(self, voice: NewVoice, conditioned: Conditioned) -> VoiceRecord:
        """The database's unique key decides: of two racing creators (any nodes) exactly one INSERT wins."""
        name, key, sha, meta = voice.name, voice.key, conditioned.sha256, voice.meta
        record = voice.record(sha)
        blob: list[bytes | None] = [conditioned.data]

        def insert(conn: Connection) -> None:
            present = conn.execute("SELECT 1 FROM tts_voice_blobs WHERE sha256 = %s FOR KEY SHARE",
                                   (record.latents_sha256,)).fetchone()
            if not present:  # removed since conditioning (its last user deleted): store it again
                again = blob[0] or encode(conditioned.latents, meta)
                blob[0] = again
                record.latents_sha256 = sha256_hex(again)
                self._ensure_blob(conn, record.latents_sha256, again)
            # Keep the upload cache pointing at a blob of this audio (a delete may have dropped it).
            conn.execute(
                "INSERT INTO tts_conditioning (key, latents_sha256, engine, model_sha256, audio_sha256)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
                (key, record.latents_sha256, meta["engine"], meta["model_sha256"], meta["audio_sha256"]))
            inserted = conn.execute(
                "INSERT INTO tts_voices (name, latents_key, latents_sha256, record) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO NOTHING RETURNING name",
                (name, key, record.latents_sha256, Jsonb(record.to_dict()))).fetchone()
            if inserted is None:
                raise VoiceExists(name)

        self._database.write(insert, retry=(psycopg.errors.ForeignKeyViolation,))
        stored = blob[0]
        if stored is not None and record.latents_sha256 != sha:
            self._cache_locally(record.latents_sha256, stored)
        return record

    def delete(self, name: str) -> VoiceRecord:
        if not valid_voice_name(name):
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

        record, dropped = self._database.write(remove)  # the acknowledgement: one transaction, or nothing
        self.cache.forget(record.latents_sha256)
        self._drop_locally(dropped)
        return record

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs (in the database, or ``cache:<sha>`` for stale or corrupt local
        cache files) and leftover temp files; ``fix`` marks broken voices and removes the rest."""
        try:
            return self._check(fix)
        except OSError as exc:  # the local cache directory cannot be written
            raise storage_error(exc, self.data_dir) or DatabaseUnavailable(str(exc)) from None

    def _check(self, fix: bool) -> dict[str, list[str]]:
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        with self._lock:
            for record in self.records():
                detail = "marked broken" if record.status == "broken" else self._verify_blob(record.latents_sha256)
                if detail is None:
                    continue
                report["broken"].append(record.name)
                if fix and record.status != "broken":
                    self._mark_broken(record, detail)
            orphans = self._database.read(
                "SELECT b.sha256 FROM tts_voice_blobs b"
                " WHERE NOT EXISTS (SELECT 1 FROM tts_voices v WHERE v.latents_sha256 = b.sha256)"
                " AND NOT EXISTS (SELECT 1 FROM tts_conditioning c WHERE c.latents_sha256 = b.sha256)"
                " ORDER BY b.sha256")
            for (sha,) in orphans:
                report["orphans"].append(sha)
                if fix:
                    self._database.write(partial(self._drop_blob_if_unreferenced, sha256=sha))
            known = {row[0] for row in self._database.read("SELECT sha256 FROM tts_voice_blobs")}
            for sha in self.store.keys():
                if sha in known and self.store.sha256_of(sha) == sha:
                    continue
                report["orphans"].append(f"cache:{sha}")
                if fix:
                    self.cache.forget(sha)
                    self.store.delete(sha)
            for tmp in self.store.temp_files():
                report["temp_files"].append(str(tmp))
                if fix:
                    tmp.unlink(missing_ok=True)
        return report

    def _verify_blob(self, sha256: str) -> str | None:
        """What is wrong with the database's copy of a blob, or None."""
        rows = self._database.read("SELECT data FROM tts_voice_blobs WHERE sha256 = %s", (sha256,))
        if not rows:
            return "blob is missing from the registry database"
        return problem(bytes(rows[0][0]), sha256)


def _storable(text: str) -> bool:
    """Whether PostgreSQL text and jsonb can hold this string (no NUL, valid UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
