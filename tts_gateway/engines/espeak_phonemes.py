"""IPA → espeak-ng's own phoneme names, so an IPA lexicon entry or SSML ``<phoneme>`` reaches espeak-ng.

espeak-ng reads phonemes written inline as ``[[ … ]]``, but in its own (Kirshenbaum-like) names, not IPA:
"təˈmɑːtoʊ" is ``t@m'A:toU``. The names are mostly shared by its languages; where a language names a sound
its own way (English's final schwa, its "oʊ"/"əʊ" diphthong), the language's table comes first. Symbols
that have no name here are dropped (espeak-ng would read an unknown one as a pause).
"""

from __future__ import annotations

import re

_COMMON: dict[str, str] = {
    # stress, length, syllables
    "ˈ": "'", "ˌ": ",", "ː": ":", "ˑ": "", ".": "", "‿": "",
    # affricates before their parts
    "tʃ": "tS", "dʒ": "dZ", "ʧ": "tS", "ʤ": "dZ", "ts": "ts", "pf": "pf",
    # consonants
    "p": "p", "b": "b", "t": "t", "d": "d", "k": "k", "g": "g", "ɡ": "g", "ʔ": "?", "f": "f", "v": "v",
    "θ": "T", "ð": "D", "s": "s", "z": "z", "ʃ": "S", "ʒ": "Z", "ç": "C", "x": "x", "ɣ": "Q", "χ": "X",
    "h": "h", "ɦ": "h", "m": "m", "n": "n", "ɲ": "n^", "ŋ": "N", "l": "l", "ɫ": "l", "ʎ": "l^", "r": "r",
    "ɾ": "*", "ɹ": "r", "ʁ": "r", "ʀ": "r", "w": "w", "j": "j", "ʋ": "v", "β": "B", "ʝ": "j",
    # vowels
    "i": "i", "ɪ": "I", "e": "e", "ɛ": "E", "æ": "a", "a": "a", "ɐ": "6", "ɑ": "A", "ɒ": "0", "ɔ": "O",
    "o": "o", "ʊ": "U", "u": "u", "ʌ": "V", "ə": "@", "ɜ": "3", "ɚ": "3", "ɝ": "3:", "y": "y", "ʏ": "Y",
    "ø": "Y", "œ": "W", "ɨ": "i", "ʉ": "u", "ɯ": "u",
    # nasal vowels (French, Portuguese): the tilde after the vowel
    "\u0303": "~",
}

# Per language, what it names its own way (base language code → IPA → name); longest IPA first.
_LANGUAGE: dict[str, dict[str, str]] = {
    "en": {"oʊ": "oU", "əʊ": "oU", "eɪ": "eI", "aɪ": "aI", "aʊ": "aU", "ɔɪ": "OI", "ɪə": "i@", "eə": "e@",
           "ʊə": "U@", "ɜː": "3:", "ɑː": "A:", "ɔː": "O:", "iː": "i:", "uː": "u:", "ə$": "3", "ɐ": "a#"},
    "de": {"ɾ": "r"},
    "es": {"ɾ": "**", "r": "R2"},
}


def _table(language: str) -> list[tuple[str, str]]:
    own = _LANGUAGE.get(language.lower().replace("_", "-").split("-")[0], {})
    merged = {**_COMMON, **own}
    # Longest first; of equal length, a word-final form before the plain one.
    return sorted(merged.items(), key=lambda pair: (-len(pair[0].rstrip("$")), not pair[0].endswith("$")))


def ipa_to_espeak(ipa: str, language: str) -> str:
    """``ipa`` (one or more words, space-separated) in espeak-ng's phoneme names for ``language``."""
    table = _table(language)
    words = []
    for word in ipa.split():
        out: list[str] = []
        at = 0
        while at < len(word):
            for symbol, name in table:
                final = symbol.endswith("$")
                bare = symbol.rstrip("$")
                if word.startswith(bare, at) and (not final or at + len(bare) == len(word)):
                    out.append(name)
                    at += len(bare)
                    break
            else:
                at += 1  # no name here: left out
        words.append("".join(out))
    return " ".join(word for word in words if word)


_BLOCK = re.compile(r"\[\[(.*?)\]\]", re.S)


def espeak_text(text: str, language: str) -> str:
    """``text`` with each ``[[ IPA ]]`` block (from the lexicon or SSML) in espeak-ng's names."""
    return _BLOCK.sub(lambda m: f"[[{ipa_to_espeak(m.group(1), language)}]]", text)
