"""Applying lexicon entries to text: whole words, case-aware.

Words are bounded by anything but the letters and digits of a script that spaces its words. An entry
written in lower case ("nginx") matches the word however it is capitalised ("Nginx", "NGINX"); an entry
with a capital ("US", "Reading") matches only as written, so "US" never respells "us".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from tts_gateway.voices.lexicon import LexiconEntry

# A letter or digit of a script that puts spaces between words. Chinese and Japanese do not, so their
# characters never join a word: "GPUです" holds the word "GPU", and "東京" is found inside a sentence.
_SPACED_WORD = r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


@lru_cache(maxsize=128)
def _pattern(words: frozenset[str]) -> re.Pattern[str]:
    alternatives = [f"(?i:{re.escape(w)})" if w == w.lower() else re.escape(w)
                    for w in sorted(words, key=len, reverse=True)]
    return re.compile(rf"(?<!{_SPACED_WORD})(?<!['’])(?:" + "|".join(alternatives) +
                      rf")(?!{_SPACED_WORD}|['’]|\.\w)")


def respell(text: str, entries: Mapping[str, LexiconEntry], phonemes: bool = False) -> tuple[str, list[str]]:
    """``text`` with every word that has an entry replaced by its respelling, or, for an engine that takes
    phonemes, by its IPA as ``[[ … ]]``; and the entries' words that applied. An IPA entry is left out for
    other engines: the word is spoken as written."""
    usable = {word: entry.respelling or f"[[{entry.ipa}]]" for word, entry in entries.items()
              if entry.respelling or (phonemes and entry.ipa)}
    if not usable or not text:
        return text, []
    lowered = {word.lower(): spoken for word, spoken in usable.items() if word == word.lower()}
    applied: dict[str, None] = {}

    def swap(match: re.Match[str]) -> str:
        written = match.group()
        key = written if written in usable else written.lower()
        spoken = usable.get(written) or lowered[key]
        applied[written if written in usable else key] = None
        return spoken

    return _pattern(frozenset(usable)).sub(swap, text), list(applied)
