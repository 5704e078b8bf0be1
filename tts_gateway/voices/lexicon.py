"""The pronunciation lexicon: words mapped to a respelling (every engine) or IPA (engines that take phonemes).

Entries live per *scope* and language: scope ``""`` is the gateway-wide lexicon, a preset's name its own
(a preset's entries win over the gateway's). `LocalLexicon` keeps them in one JSON file written like the
registry's records (temp file → fsync → rename → fsync of the directory), so an acknowledged write survives
a kill -9; `PostgresLexicon` (pg_lexicon.py) keeps them in the registry's database, shared by every node.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tts_gateway.errors import InvalidField, NotFound

log = logging.getLogger(__name__)

MAX_WORD_CHARS = 64
MAX_SPOKEN_CHARS = 256
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{2,8})?$")
# A word or a short phrase of words: letters, digits, apostrophes, dots and hyphens inside ("Dr.", "e-mail").
WORD_RE = re.compile(r"^[^\W_](?:[\w'’.\- ]{0,62}[\w.])?$")


@dataclass(frozen=True)
class LexiconEntry:
    word: str
    language: str
    respelling: str | None = None
    ipa: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def lexicon_language(language: str) -> str:
    """The key a language's entries are kept under: its base code (``en-US`` and ``en`` share ``en``)."""
    code = language.strip().lower().replace("_", "-")
    if not LANGUAGE_RE.match(code):
        raise InvalidField("language", f"{language[:20]!r} is not a language code (en, de, pt-br, …)")
    return code.split("-")[0]


def check_entry(entry: LexiconEntry) -> LexiconEntry:
    """The entry with its language keyed; `InvalidField` when a part is unusable."""
    if not WORD_RE.match(entry.word) or len(entry.word) > MAX_WORD_CHARS:
        raise InvalidField("word", f"{entry.word[:40]!r} is not a word (letters and digits, with ' . - or spaces "
                                   f"inside, at most {MAX_WORD_CHARS} characters)")
    if (entry.respelling is None) == (entry.ipa is None):
        raise InvalidField("respelling", "send exactly one of respelling and ipa")
    for name, value in (("respelling", entry.respelling), ("ipa", entry.ipa)):
        if value is not None and (not value.strip() or len(value) > MAX_SPOKEN_CHARS or
                                  any(ord(ch) < 32 or ch in "<>&[]" for ch in value)):
            raise InvalidField(name, f"must be 1–{MAX_SPOKEN_CHARS} characters of text, without < > & [ ] or "
                                     "control characters")
    return LexiconEntry(entry.word, lexicon_language(entry.language), entry.respelling, entry.ipa)


@runtime_checkable
class Lexicon(Protocol):
    """Where lexicon entries are kept."""

    def entries(self, language: str, scope: str = "") -> dict[str, LexiconEntry]:
        """Every entry of ``scope`` for ``language``, by word."""
        ...

    def get(self, language: str, word: str, scope: str = "") -> LexiconEntry:
        """One entry; `LexiconEntryNotFound` when there is none."""
        ...

    def put(self, entry: LexiconEntry, scope: str = "") -> bool:
        """Add or replace ``entry``; True when it is new. Durable when this returns."""
        ...

    def delete(self, language: str, word: str, scope: str = "") -> None:
        """Remove one entry; `LexiconEntryNotFound` when there is none."""
        ...

    def drop_scope(self, scope: str) -> None:
        """Remove every entry of ``scope`` (a preset that was deleted)."""
        ...

    def close(self) -> None: ...


class LexiconEntryNotFound(NotFound):
    def __init__(self, language: str, word: str, scope: str) -> None:
        where = f"preset {scope!r}" if scope else "the lexicon"
        super().__init__(f"{where} has no {language} entry for {word[:64]!r}", code="lexicon-entry-not-found")


class LocalLexicon:
    """The lexicon in ``<data dir>/lexicon.json``: ``{scope: {language: {word: entry}}}``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lexicon.json"
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, dict[str, dict[str, Any]]]] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            aside = self.path.with_suffix(".damaged.json")
            log.error("lexicon %s is unreadable (%s); moved aside to %s", self.path, exc, aside)
            os.replace(self.path, aside)
            return {}
        return raw if isinstance(raw, dict) else {}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".lexicon-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self._data, out, ensure_ascii=False, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def entries(self, language: str, scope: str = "") -> dict[str, LexiconEntry]:
        code = lexicon_language(language)
        with self._lock:
            found = dict(self._data.get(scope, {}).get(code, {}))
        return {word: LexiconEntry(word, code, raw.get("respelling"), raw.get("ipa")) for word, raw in found.items()}

    def get(self, language: str, word: str, scope: str = "") -> LexiconEntry:
        entry = self.entries(language, scope).get(word)
        if entry is None:
            raise LexiconEntryNotFound(lexicon_language(language), word, scope)
        return entry

    def put(self, entry: LexiconEntry, scope: str = "") -> bool:
        entry = check_entry(entry)
        value = {k: v for k, v in (("respelling", entry.respelling), ("ipa", entry.ipa)) if v is not None}
        with self._lock:
            words = self._data.setdefault(scope, {}).setdefault(entry.language, {})
            new = entry.word not in words
            previous = words.get(entry.word)
            words[entry.word] = value
            try:
                self._write()
            except BaseException:
                if previous is None:
                    del words[entry.word]
                else:
                    words[entry.word] = previous
                raise
        return new

    def delete(self, language: str, word: str, scope: str = "") -> None:
        code = lexicon_language(language)
        with self._lock:
            words = self._data.get(scope, {}).get(code, {})
            if word not in words:
                raise LexiconEntryNotFound(code, word, scope)
            previous = words.pop(word)
            try:
                self._write()
            except BaseException:
                words[word] = previous
                raise

    def close(self) -> None:
        """Nothing is held open: every write is complete when it returns."""

    def drop_scope(self, scope: str) -> None:
        with self._lock:
            if self._data.pop(scope, None) is not None:
                self._write()


__all__ = ["Lexicon", "LexiconEntry", "LexiconEntryNotFound", "LocalLexicon", "check_entry", "lexicon_language"]
