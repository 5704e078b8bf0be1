"""The pronunciation lexicon in the registry's PostgreSQL database, shared by every gateway node.

Table ``tts_lexicon`` (scope, language, word) → respelling or ipa, created on first use. A write is one
committed transaction, so it is durable when the call returns.
"""

from __future__ import annotations

import threading

from tts_gateway.voices.lexicon import LexiconEntry, LexiconEntryNotFound, check_entry, lexicon_language
from tts_gateway.voices.pg_database import Connection, Database

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

    def entries(self, language: str, scope: str = "") -> dict[str, LexiconEntry]:
        code = lexicon_language(language)
        rows = self._database.read("SELECT word, respelling, ipa FROM tts_lexicon WHERE scope = %s AND language = %s",
                                   (scope, code))
        return {word: LexiconEntry(word, code, respelling, ipa) for word, respelling, ipa in rows}

    def get(self, language: str, word: str, scope: str = "") -> LexiconEntry:
        entry = self.entries(language, scope).get(word)
        if entry is None:
            raise LexiconEntryNotFound(lexicon_language(language), word, scope)
        return entry

    def put(self, entry: LexiconEntry, scope: str = "") -> bool:
        entry = check_entry(entry)

        def upsert(conn: Connection) -> bool:
            row = conn.execute(
                "INSERT INTO tts_lexicon (scope, language, word, respelling, ipa) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (scope, language, word) DO UPDATE SET respelling = EXCLUDED.respelling,"
                " ipa = EXCLUDED.ipa RETURNING (xmax = 0)",
                (scope, entry.language, entry.word, entry.respelling, entry.ipa)).fetchone()
            return bool(row and row[0])

        return self._database.write(upsert)

    def delete(self, language: str, word: str, scope: str = "") -> None:
        code = lexicon_language(language)

        def remove(conn: Connection) -> int:
            cur = conn.execute("DELETE FROM tts_lexicon WHERE scope = %s AND language = %s AND word = %s",
                               (scope, code, word))
            return int(cur.rowcount)

        if not self._database.write(remove):
            raise LexiconEntryNotFound(code, word, scope)

    def drop_scope(self, scope: str) -> None:
        self._database.write(lambda conn: conn.execute("DELETE FROM tts_lexicon WHERE scope = %s", (scope,)))
