"""The pronunciation lexicon in the registry's PostgreSQL database, shared by every gateway node.

Table ``tts_lexicon`` (scope, language, word) → respelling or ipa, created on first use. A write is one
committed transaction, so it is durable when the call returns.

Synthesis reads entries on every request, sometimes on an event loop (Wyoming plans a built-in voice's
request there), so it reads a snapshot of the table kept in memory: a write on this node replaces it at
once, and a snapshot older than `REFRESH_S` is read again in the background while the old one still
answers (another node's write is seen within about a second); while the database cannot be read, speech
goes on with the last snapshot (or none). The admin calls read and write the table itself.
"""

from __future__ import annotations

import logging
import threading
import time

from tts_gateway.voices.lexicon import LexiconEntry, LexiconEntryNotFound, check_entry, lexicon_language
from tts_gateway.voices.pg_database import Connection, Database, first_line

log = logging.getLogger(__name__)

REFRESH_S = 1.0
Snapshot = dict[tuple[str, str], dict[str, LexiconEntry]]  # (scope, language) → word → entry

SCHEMA = """CREATE TABLE IF NOT EXISTS tts_lexicon (
    scope text NOT NULL,
    language text NOT NULL,
    word text NOT NULL,
    respelling text,
    ipa text,
    PRIMARY KEY (scope, language, word),
    CONSTRAINT tts_lexicon_one_form CHECK ((respelling IS NULL) <> (ipa IS NULL))
)"""


class PostgresLexicon:
    """`Lexicon` over PostgreSQL (see `tts_gateway.voices.lexicon.Lexicon`)."""

    def __init__(self, url: str, *, pool_size: int = 2) -> None:
        self._url = url
        self._pool_size = pool_size
        self._opened: Database | None = None
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0
        self._refreshing = False

    @property
    def _database(self) -> Database:
        # Opened on first use: a process that never reads the lexicon (a Ray replica) holds no connection.
        with self._lock:
            if self._opened is None:
                database = Database(self._url, pool_size=self._pool_size)
                try:
                    database.write(lambda conn: conn.execute(SCHEMA))
                except BaseException:
                    database.close()
                    raise
                self._opened = database
            return self._opened

    def close(self) -> None:
        with self._lock:
            if self._opened is not None:
                self._opened.close()
                self._opened = None

    # -- the snapshot synthesis reads --------------------------------------------------------------
    def _read_all(self) -> Snapshot:
        rows = self._database.read("SELECT scope, language, word, respelling, ipa FROM tts_lexicon")
        snapshot: Snapshot = {}
        for scope, language, word, respelling, ipa in rows:
            snapshot.setdefault((scope, language), {})[word] = LexiconEntry(word, language, respelling, ipa)
        with self._lock:
            self._snapshot, self._read_at = snapshot, time.monotonic()
        return snapshot

    def _refresh(self) -> None:
        try:
            self._read_all()
        except Exception as exc:  # the last snapshot keeps answering; the next read tries again
            log.warning("lexicon not refreshed from the database: %s", first_line(exc))
        finally:
            with self._lock:
                self._refreshing = False

    def _current(self) -> Snapshot:
        with self._lock:
            snapshot = self._snapshot
            stale = snapshot is not None and time.monotonic() - self._read_at > REFRESH_S and not self._refreshing
            if stale:
                self._refreshing = True
        if snapshot is None:
            try:
                return self._read_all()
            except Exception as exc:
                # Speech does not wait for pronunciations: without the database it goes on without entries
                # (a warning), and the next read after REFRESH_S tries again.
                log.warning("lexicon not read from the database, speaking without it: %s", first_line(exc))
                with self._lock:
                    if self._snapshot is None:
                        self._snapshot, self._read_at = {}, time.monotonic()
                    return self._snapshot
        if stale:
            threading.Thread(target=self._refresh, name="tts-lexicon-refresh", daemon=True).start()
        return snapshot

    def entries(self, language: str, scope: str = "") -> dict[str, LexiconEntry]:
        return dict(self._current().get((scope, lexicon_language(language)), {}))

    def get(self, language: str, word: str, scope: str = "") -> LexiconEntry:
        code = lexicon_language(language)
        rows = self._database.read("SELECT respelling, ipa FROM tts_lexicon WHERE scope = %s AND language = %s"
                                   " AND word = %s", (scope, code, word))
        if not rows:
            raise LexiconEntryNotFound(code, word, scope)
        return LexiconEntry(word, code, rows[0][0], rows[0][1])

    def put(self, entry: LexiconEntry, scope: str = "") -> bool:
        entry = check_entry(entry)

        def upsert(conn: Connection) -> bool:
            row = conn.execute(
                "INSERT INTO tts_lexicon (scope, language, word, respelling, ipa) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (scope, language, word) DO UPDATE SET respelling = EXCLUDED.respelling,"
                " ipa = EXCLUDED.ipa RETURNING (xmax = 0)",
                (scope, entry.language, entry.word, entry.respelling, entry.ipa)).fetchone()
            return bool(row and row[0])

        new = self._database.write(upsert)
        self._read_all()
        return new

    def delete(self, language: str, word: str, scope: str = "") -> None:
        code = lexicon_language(language)

        def remove(conn: Connection) -> int:
            cur = conn.execute("DELETE FROM tts_lexicon WHERE scope = %s AND language = %s AND word = %s",
                               (scope, code, word))
            return int(cur.rowcount)

        if not self._database.write(remove):
            raise LexiconEntryNotFound(code, word, scope)
        self._read_all()

    def drop_scope(self, scope: str) -> None:
        self._database.write(lambda conn: conn.execute("DELETE FROM tts_lexicon WHERE scope = %s", (scope,)))
        self._read_all()
