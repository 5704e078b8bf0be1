"""The PostgreSQL registry's tables, and setting them up when a gateway starts.

Schema (created on first use, under an advisory lock so that nodes starting together do not race):

  tts_voice_blobs   sha256 text PK, data bytea — CHECK (sha256 = encode(sha256(data), 'hex')): the database
                    itself refuses bytes that do not match their name.
  tts_voices        name text PK (the unique name: of two racing creators exactly one INSERT wins),
                    latents_key, latents_sha256 → tts_voice_blobs, record jsonb (the `VoiceRecord`).
  tts_conditioning  key text PK (= latents_key(audio, engine, model)) → latents_sha256, used_at: the upload
                    cache of the old ``/synthesize`` call, shared by every node. The first writer of a key wins; a
                    node that computed the same audio meanwhile uses the winner's blob. Bounded: past
                    ``upload_cache_entries`` rows no preset uses, the least recently used go, with their blobs
                    (schema version 2 added ``used_at``).

Blobs are referenced by foreign keys, so one still used by a voice or by the upload cache cannot be deleted;
a blob is removed in the same transaction that drops its last reference.
"""

from __future__ import annotations

import logging
import time

import psycopg

from tts_gateway.voices.pg_database import APPLICATION_NAME, CONNECT_TIMEOUT_S, Connection, first_line, redact
from tts_gateway.voices.registry import RegistryConnectError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MIN_SERVER_VERSION = 110000  # sha256(bytea) arrived in PostgreSQL 11
_SCHEMA_LOCK = 0x7474_7376_6F69_6365  # "ttsvoice": the pg_advisory_xact_lock key of schema set-up

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
    # version 2: the upload cache is bounded, least recently used first
    """ALTER TABLE tts_conditioning ADD COLUMN IF NOT EXISTS used_at timestamptz NOT NULL DEFAULT now()""",
    """CREATE INDEX IF NOT EXISTS tts_conditioning_used_at ON tts_conditioning (used_at)""",
)


def setup(url: str, timeout: float) -> None:
    """Reach the database (trying again for up to ``timeout`` seconds) and bring its schema up to date.

    Raises `RegistryConnectError` (the URL without its password) when it stays unreachable or cannot be set up.
    """
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                 application_name=APPLICATION_NAME) as conn:
                migrate(conn)
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise RegistryConnectError(
                    f"cannot reach the voice registry database TTS_GATEWAY_REGISTRY_URL={redact(url)}: "
                    f"{first_line(exc)}") from None
            log.warning("registry database not reachable yet (%s); retrying", first_line(exc))
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        except psycopg.Error as exc:
            raise RegistryConnectError(
                f"cannot set up the voice registry in TTS_GATEWAY_REGISTRY_URL={redact(url)}: "
                f"{first_line(exc)}") from None


def migrate(conn: Connection) -> None:
    """Create the tables, or bring an older schema to `SCHEMA_VERSION`; refuse a server or schema too new."""
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
            if found is None or found < SCHEMA_VERSION:
                conn.execute("INSERT INTO tts_registry_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
                found = SCHEMA_VERSION
    if found > SCHEMA_VERSION:
        raise RegistryConnectError(
            f"the registry database has schema version {found}; this gateway knows {SCHEMA_VERSION}: "
            "upgrade the gateway")
