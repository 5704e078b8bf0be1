"""Written forms → spoken words, per language: numbers, years, dates, times, money, percentages, units,
phone-like digit strings and abbreviations.

num2words spells the numbers; `rules` holds what differs per language. The passes run in a fixed order
(abbreviations, money, times, dates, phone numbers, ordinals, ranges, percentages, units, plain numbers)
so each sees only digits no earlier pass claimed; words never contain digits, so no pass rewrites
another's output. A language num2words lacks passes through unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from num2words import CONVERTER_CLASSES, num2words

from tts_gateway.core.frontend.rules import FULL, LanguageRules, numbers_only

_AND = {"en": "and", "de": "und", "fr": "et", "es": "con"}
# The decimal sign's word where num2words has none or reads decimals wrongly (it: "3,5" → "tre").
_POINT = {"en": "point", "de": "Komma", "fr": "virgule", "es": "coma", "it": "virgola"}
_PLUS = {"en": "plus", "de": "plus", "fr": "plus", "es": "más"}
# Spoken forms of a currency when num2words has none for the language.
_CURRENCY_SYMBOLS = "$€£"


def num2words_code(language: str) -> str | None:
    """num2words' code for a gateway language (``pt-br`` → ``pt_BR``, ``en-us`` → ``en``), or None."""
    parts = language.strip().lower().replace("_", "-").split("-")
    if len(parts) > 1:
        regional = f"{parts[0]}_{parts[1].upper()}"
        if regional in CONVERTER_CLASSES:
            return regional
    return parts[0] if parts[0] in CONVERTER_CLASSES else None


def _words(text: str) -> str:
    # num2words writes "one thousand, two hundred": a comma there would make engines pause.
    return text.replace(",", "")


SMALL = 100
_DIGIT = re.compile(r"\d")
_PLAIN = re.compile(r"\d+(?:\.\d+)?")
_YEARISH = re.compile(r"1[1-9]\d\d|20\d\d")


def _scan(first: str, pattern: str) -> re.Pattern[str]:
    """``pattern``, led by a lookahead of the characters a match can start with.

    It changes nothing a pattern matches: a pattern that opens with a lookbehind gets no fast scan from
    Python's engine, which then tries every position in full; the lookahead (``first``: a class such as
    ``[-\\d]``) rules out most positions at once — three times faster on text with few digits.
    """
    return re.compile(f"(?={first}){pattern}")


class Normalizer:
    """The spoken form of text in one language (built once per language: the patterns are compiled here)."""

    def __init__(self, rules: LanguageRules) -> None:
        self.rules = rules
        self.lang = rules.code
        # 0…100 in words, cardinal and ordinal: the numbers text has most (digits of phones, times, days)
        self._small: dict[tuple[str, int], str] = {}
        self._years: dict[int, str] | None = None  # the years read in pairs ("nineteen ninety-nine")
        base = rules.code.split("_")[0]
        self.base = base
        dec = re.escape(rules.decimal)
        if rules.thousands:
            groups = "|".join(re.escape(t) for t in rules.thousands)
            grouped = rf"\d{{1,3}}(?:(?:{groups})\d{{3}})+(?:{dec}\d+)?"
        else:
            grouped = None
        # A period or comma between digits that is not a thousands group reads as a decimal sign.
        plain = r"\d+(?:[.,]\d+)?" if rules.decimal == "," else rf"\d+(?:{dec}\d+)?"
        self.num = f"(?:{grouped}|{plain})" if grouped else f"(?:{plain})"
        self.number_re = _scan(r"[-−\d]", rf"(?<![\d.,])(?P<neg>(?<![\w\d])[-−])?(?P<num>{self.num})(?![\d])")
        self._grouped = [re.compile(rf"\d{{1,3}}(?:{re.escape(sep)}\d{{3}})+(?:{dec}\d+)?") for sep in rules.thousands]
        self.passes: list[Callable[[str], str]] = []  # words (abbreviations), first
        self.digit_passes: list[Callable[[str], str]] = []  # what only rewrites text with digits, in order
        if rules.full:
            self._full_passes()
        self.digit_passes.append(lambda text: self.number_re.sub(self._number_match, text))

    # -- numbers ------------------------------------------------------------------------------------
    def value(self, written: str) -> Decimal | None:
        """The number ``written`` (with this language's separators), or None."""
        text = written
        for sep, grouped in zip(self.rules.thousands, self._grouped, strict=True):
            if grouped.fullmatch(text):
                text = text.replace(sep, "")
        text = text.replace(",", ".") if self.rules.decimal == "," else text
        if not _PLAIN.fullmatch(text):  # Decimal also reads "NaN", "1e5" and "Infinity"
            return None
        try:
            return Decimal(text)
        except InvalidOperation:
            return None

    def cardinal(self, value: Decimal | int) -> str:
        if isinstance(value, Decimal) and value != value.to_integral_value():
            return self.decimal(value)
        return self._spell(int(value), "cardinal")

    def _spell(self, number: int, to: str) -> str:
        """num2words' ``to`` form of ``number``; from 0 to 100 spelled once."""
        if not 0 <= number <= SMALL:
            return _words(num2words(number, lang=self.lang, to=to))
        words = self._small.get((to, number))
        if words is None:
            words = self._small[(to, number)] = _words(num2words(number, lang=self.lang, to=to))
        return words

    def decimal(self, value: Decimal) -> str:
        sign, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int)
        whole = abs(int(value))
        fraction = "".join(str(d) for d in digits[len(digits) + exponent:]) if exponent < 0 else ""
        fraction = fraction.rjust(-exponent, "0") if exponent < 0 else fraction
        point = _POINT.get(self.base)
        if not point or not fraction:
            return _words(num2words(value, lang=self.lang))
        if self.base in ("fr", "es") and not fraction.startswith("0") and len(fraction) <= 2:
            tail = self.cardinal(int(fraction))  # French and Spanish read "3,14" as "trois virgule quatorze"
        else:
            tail = " ".join(self.cardinal(int(d)) for d in fraction)
        out = f"{self.cardinal(whole)} {point} {tail}"
        return f"{self.rules.minus} {out}" if sign else out

    def ordinal(self, value: int) -> str:
        return self._spell(value, "ordinal")

    def year(self, value: int) -> str:
        if (self.base in ("en", "de") and 1100 <= value <= 1999) or (self.base == "en" and 2010 <= value <= 2099):
            if self._years is None:
                # Every year of the range at once, on first use (15 ms in English, 40 in German): text is full
                # of years, and num2words takes 16-70 µs for each, more than the rest of a sentence's rules.
                self._years = {year: _words(num2words(year, lang=self.lang, to="year")) for year in
                               (*range(1100, 2000), *(range(2010, 2100) if self.base == "en" else ()))}
            return self._years[value]
        return self.cardinal(value)

    def _number_match(self, match: re.Match[str]) -> str:
        try:
            spoken = self._number(match)
        except (ArithmeticError, LookupError, NotImplementedError, TypeError, ValueError):
            return match.group()  # a number num2words cannot say in this language stays written
        start = match.start()
        # "MP3" → "MP three": the engine reads a word, not a letter glued to one.
        return f" {spoken}" if start and match.string[start - 1].isalpha() else spoken

    def _number(self, match: re.Match[str]) -> str:
        value = self.value(match["num"])
        if value is None:
            return match.group()
        neg = match["neg"]
        written = match["num"]
        if not neg and self.rules.full and _YEARISH.fullmatch(written):
            return self.year(int(written))  # a bare four-digit number in this range is most often a year
        words = self.cardinal(value)
        if neg:
            words = f"{self.rules.minus} {words}"
        return words

    # -- the passes of a language with a full table -------------------------------------------------
    def _full_passes(self) -> None:
        r = self.rules
        num = self.num
        if r.titles or r.abbreviations:
            table = {**r.abbreviations, **r.titles}
            keys = sorted(table, key=len, reverse=True)
            # German capitalises every noun: there only the end of the text ends a sentence for sure.
            ends = r"\s*$" if self.base == "de" else r"\s*[A-ZÀ-Ý]|\s*$"
            starts = "".join(sorted({re.escape(k[0]) for k in keys}))
            pattern = _scan(f"[{starts}]", r"(?<![\w.])(" + "|".join(re.escape(k) for k in keys) +
                            rf")(?!\w)(?P<next>{ends})?")

            def abbreviation(m: re.Match[str]) -> str:
                key = m.group(1)
                spoken = table[key]
                after = m["next"] or ""
                # An abbreviation (not a title) that ends its sentence keeps the sentence's period.
                keep = key.endswith(".") and key not in r.titles and m["next"] is not None
                return spoken + ("." if keep else "") + after

            self.passes.append(lambda text: pattern.sub(abbreviation, text))
        symbols = "".join(re.escape(s) for s in r.currencies)
        before = _scan(f"[-{symbols}]", rf"(?P<neg>-)?(?P<sym>[{symbols}])\s?(?P<num>{num})(?![\d])")
        after = _scan(r"[-\d]", rf"(?<![\d.,])(?P<neg>-)?(?P<num>{num})\s?(?P<sym>[{symbols}])")
        self.digit_passes.append(lambda text: after.sub(self._money, before.sub(self._money, text)))
        self.digit_passes.append(self._times)
        self.digit_passes.append(self._dates)
        self.digit_passes.append(self._phones)
        if r.ordinal_suffix:
            ordinal = _scan(r"\d", rf"(?<![\d.,])(\d+)(?:{r.ordinal_suffix})(?!\w)")
            self.digit_passes.append(lambda text: ordinal.sub(self._ordinal_match, text))
        ranged = _scan(r"\d", r"(?<![\d.,\w-])(\d+(?:[.,]\d+)?)\s?[-–]\s?(\d+(?:[.,]\d+)?)(?![\d.,]\d)")
        self.digit_passes.append(lambda text: ranged.sub(rf"\1 {r.range_word} \2", text))
        percent = _scan(r"[-−\d]", rf"(?<![\d.,])(?P<neg>(?<![\w\d])[-−])?(?P<num>{num})\s?%")
        self.digit_passes.append(lambda text: percent.sub(lambda m: f"{self._signed(m)} {r.percent}", text))
        if r.units:
            keys = sorted(r.units, key=len, reverse=True)
            unit_re = _scan(r"[-−\d]", rf"(?<![\d.,])(?P<neg>(?<![\w\d])[-−])?(?P<num>{num})\s?"
                            r"(?P<unit>" + "|".join(re.escape(k) for k in keys) + r")(?![\w/])")
            self.digit_passes.append(lambda text: unit_re.sub(self._unit_match, text))

    def _signed(self, m: re.Match[str]) -> str:
        value = self.value(m["num"])
        if value is None:
            return m.group()
        words = self.cardinal(value)
        return f"{self.rules.minus} {words}" if m["neg"] else words

    def _unit_match(self, m: re.Match[str]) -> str:
        value = self.value(m["num"])
        if value is None:
            return m.group()
        singular, plural = self.rules.units[m["unit"]]
        unit = singular if value == 1 and not m["neg"] else plural
        return f"{self._signed(m)} {unit}"

    def _ordinal_match(self, m: re.Match[str]) -> str:
        value = int(m.group(1))
        if self.base == "de":
            return self.ordinal(value) + "r"  # "3. Mai" → "dritter Mai"
        if self.base == "fr" and value == 1:
            return "première" if m.group().endswith(("re", "ère")) else "premier"
        return self.ordinal(value)

    def _money(self, m: re.Match[str]) -> str:
        value = self.value(m["num"])
        code = self.rules.currencies.get(m["sym"])
        forms = getattr(CONVERTER_CLASSES[self.lang], "CURRENCY_FORMS", {}).get(code or "")
        if value is None or not forms:
            return m.group()
        (unit_one, unit_many), (cent_one, cent_many) = forms[0], forms[1]
        whole = int(value)
        cents = int((value - whole) * 100)
        parts = []
        if whole or not cents:
            parts.append(f"{self.cardinal(whole)} {unit_one if whole == 1 else unit_many}")
        if cents:
            parts.append(f"{self.cardinal(cents)} {cent_one if cents == 1 else cent_many}")
        spoken = f" {_AND.get(self.base, 'and')} ".join(parts)
        if self.base == "de" and whole == 1:
            spoken = spoken.replace("eins ", "ein ", 1)
        if self.base in ("fr", "es") and whole == 1:
            spoken = spoken.replace("uno ", "un ", 1)
        return f"{self.rules.minus} {spoken}" if m["neg"] else spoken

    # -- times ----------------------------------------------------------------------------------------
    _TIME = _scan(r"\d", r"(?<![\d.,:])(?P<h>\d{1,2})(?::|(?P<fr>h))(?P<m>\d{2})(?![\d:])"
                       r"(?:\s?(?P<ampm>[AaPp])(?:\.?[Mm]\.(?=\s+[a-z0-9])|\.?[Mm](?!\w)))?(?P<uhr>\s?Uhr\b)?")
    _FR_HOUR = _scan(r"\d", r"(?<![\d.,:])(?P<h>\d{1,2})h(?![\w])")

    def _times(self, text: str) -> str:
        text = self._TIME.sub(self._time_match, text)
        if self.base == "fr":
            text = self._FR_HOUR.sub(lambda m: self._fr_time(int(m["h"]), 0) if int(m["h"]) < 24 else m.group(), text)
        return text

    def _time_match(self, m: re.Match[str]) -> str:
        hour, minute = int(m["h"]), int(m["m"])
        if hour > 24 or minute > 59 or (m["fr"] and self.base != "fr"):
            return m.group()
        if self.base == "en":
            ampm = f" {m['ampm'].lower()} m" if m["ampm"] else ""
            if minute == 0:
                return f"{self.cardinal(hour)}{ampm}" if ampm else f"{self.cardinal(hour)} o'clock"
            spoken_minute = f"oh {self.cardinal(minute)}" if minute < 10 else self.cardinal(minute)
            return f"{self.cardinal(hour)} {spoken_minute}{ampm}"
        if self.base == "de":
            hours = "ein" if hour == 1 else self.cardinal(hour)
            return f"{hours} Uhr" + (f" {self.cardinal(minute)}" if minute else "")
        if self.base == "fr":
            return self._fr_time(hour, minute)
        if minute == 0:
            return f"{self.cardinal(hour)} horas" if hour != 1 else "una hora"
        hours = "una" if hour == 1 else self.cardinal(hour)
        return f"{hours} y {self.cardinal(minute)}"

    def _fr_time(self, hour: int, minute: int) -> str:
        hours = "une heure" if hour == 1 else f"{self.cardinal(hour)} heures"
        return hours + (f" {self.cardinal(minute)}" if minute else "")

    # -- dates ----------------------------------------------------------------------------------------
    _DATE = _scan(r"\d", r"(?<![\d.,/])(?P<a>\d{1,2})(?P<sep>[/.])(?P<b>\d{1,2})(?P=sep)(?P<y>\d{4})(?![\d])")
    _ISO = _scan(r"\d", r"(?<![\d.,/-])(?P<y>\d{4})-(?P<m>\d{2})-(?P<d>\d{2})(?![\d])")

    def _dates(self, text: str) -> str:
        def slashed(m: re.Match[str]) -> str:
            a, b = int(m["a"]), int(m["b"])
            day, month = (a, b) if self.rules.day_first or m["sep"] == "." else (b, a)
            return self.date(day, month, int(m["y"])) or m.group()

        text = self._DATE.sub(slashed, text)
        return self._ISO.sub(lambda m: self.date(int(m["d"]), int(m["m"]), int(m["y"])) or m.group(), text)

    def date(self, day: int, month: int, year: int) -> str | None:
        if not (1 <= month <= 12 and 1 <= day <= 31):
            return None
        name = self.rules.month_names[month - 1]
        if self.base == "en":
            return f"{name} {self.ordinal(day)} {self.year(year)}"
        if self.base == "de":
            return f"{self.ordinal(day)}r {name} {self.year(year)}"
        if self.base == "fr":
            return f"{'premier' if day == 1 else self.cardinal(day)} {name} {self.year(year)}"
        return f"{'primero' if day == 1 else self.cardinal(day)} de {name} de {self.year(year)}"

    # -- phone numbers --------------------------------------------------------------------------------
    _PHONE = _scan(r"[+(\d]", r"(?<![\w.,+-])(?:\+\d{1,3}[ -]?)?(?:\(\d{2,4}\)[ -]?)?\d{2,4}(?:[ -]\d{2,4}){2,}"
                        r"(?![\w.,-]?\d)")

    def _phones(self, text: str) -> str:
        def phone(m: re.Match[str]) -> str:
            written = m.group()
            # A French number grouped by thousands ("1 234 567") is not a phone number.
            if " " in written and "-" not in written and "+" not in written and "(" not in written and \
                    not (self.base == "fr" and re.fullmatch(r"0\d(?: \d\d){4}", written)) and \
                    re.fullmatch(r"\d{1,3}(?: \d{3})+", written):
                return written
            groups = re.findall(r"\+|\d+", written)
            spoken = []
            for group in groups:
                if group == "+":
                    spoken.append(_PLUS.get(self.base, "plus"))
                else:
                    spoken.append(" ".join(self.cardinal(int(d)) for d in group))
            head = spoken[0] + " " if written.startswith("+") else ""
            rest = spoken[1:] if written.startswith("+") else spoken
            return head + ", ".join(rest)

        return self._PHONE.sub(phone, text)

    # -- SSML's say-as ------------------------------------------------------------------------------
    def say_as(self, kind: str, text: str, date_format: str | None = None) -> str | None:
        """``text`` read as ``kind`` (cardinal, ordinal, date, time, telephone); None when it is not one."""
        try:
            return self._say_as(kind, text.strip(), date_format)
        except (ArithmeticError, LookupError, NotImplementedError, TypeError, ValueError):
            return None  # a number num2words cannot say (too large): not one this language can read

    def _say_as(self, kind: str, written: str, date_format: str | None) -> str | None:
        if kind == "cardinal":
            value = self.value(written.lstrip("-−"))
            return None if value is None else (f"{self.rules.minus} " if written[:1] in "-−" else "") + \
                self.cardinal(value)
        if kind == "ordinal":
            digits = re.match(r"\d+", written)
            return self.ordinal(int(digits.group())) if digits else None
        if kind == "telephone":
            groups = re.findall(r"\+|\d+", written)
            if not groups:
                return None
            return ", ".join(_PLUS.get(self.base, "plus") if g == "+" else " ".join(self.cardinal(int(c)) for c in g)
                             for g in groups)
        if kind == "time" and self.rules.full:
            spoken = self._times(written)
            return None if spoken == written else spoken
        if kind == "date" and self.rules.full:
            parts = [int(p) for p in re.findall(r"\d+", written)]
            order = (date_format or "").lower() or ("ymd" if re.match(r"\d{4}", written) else
                                                    "dmy" if self.rules.day_first else "mdy")
            if len(parts) != 3 or sorted(order) != ["d", "m", "y"]:
                return None
            found = dict(zip(order, parts, strict=True))
            return self.date(found["d"], found["m"], found["y"])
        return None

    def __call__(self, text: str) -> str:
        for step in self.passes:
            text = step(text)
        for step in self.digit_passes:
            if not _DIGIT.search(text):  # the passes spell digits out: once none are left, none has work
                break
            text = step(text)
        return text


@lru_cache(maxsize=64)
def normalizer(language: str) -> Normalizer | None:
    """The normalizer for a gateway language code, or None when there are no rules for it."""
    code = num2words_code(language)
    if code is None:
        return None
    base = code.split("_")[0]
    rules = FULL.get(base)
    if rules is not None and code != base:
        from dataclasses import replace

        rules = replace(rules, code=code)
    return Normalizer(rules or numbers_only(code))


def normalize(text: str, language: str) -> str:
    """``text`` as it is spoken in ``language``; unchanged when there are no rules for the language."""
    rules = normalizer(language)
    return rules(text) if rules is not None else text
