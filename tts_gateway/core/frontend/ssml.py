"""The SSML subset: ``<speak>``, ``<p>``, ``<s>``, ``<break>``, ``<say-as>``, ``<sub>``, ``<phoneme>``,
``<prosody rate>`` and ``<lang>``, parsed into `Segment`s.

defusedxml's SAX parser refuses DTDs, entity declarations and external references (billion laughs,
XXE) before any is expanded; the handler refuses nesting deeper than `MAX_DEPTH` as it opens the
element, so 10 000 nested tags fail at the first one too many. Every refusal names the element and
its line and column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax import SAXParseException
from xml.sax.handler import ContentHandler
from xml.sax.xmlreader import AttributesImpl, Locator

import defusedxml
import defusedxml.sax

from tts_gateway.core.frontend.segments import Segment
from tts_gateway.errors import InvalidField

MAX_DEPTH = 32
MAX_BREAK_S = 10.0
MAX_BREAKS_TOTAL_S = 60.0  # all of a document's breaks: silence costs memory like speech
STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.2, "medium": 0.4, "strong": 0.75, "x-strong": 1.2}
RATES = {"x-slow": 0.5, "slow": 0.75, "medium": 1.0, "default": 1.0, "fast": 1.25, "x-fast": 1.75}
SAY_AS = ("characters", "spell-out", "cardinal", "number", "ordinal", "date", "time", "telephone")
ELEMENTS = {"speak", "p", "s", "break", "say-as", "sub", "phoneme", "prosody", "lang"}
MIN_RATE, MAX_RATE = 0.25, 4.0
# Elements that end a word (a sentence or a pause): in the written text content too.
_PARTS_WORDS = {"p", "s", "break"}

SayAs = Callable[[str, str, str | None, str | None], str | None]  # (kind, text, format, language) → words


class SsmlError(InvalidField):
    def __init__(self, detail: str) -> None:
        super().__init__("text", f"SSML: {detail}", code="invalid-ssml")


@dataclass
class _Open:
    name: str
    rate: float
    language: str | None
    say_as: tuple[str, str | None] | None = None
    alias: str | None = None  # <sub>: say this instead of the content
    ipa: str | None = None  # <phoneme ph>
    text: str = ""  # the content of a say-as, sub or phoneme, collected until the element closes


def _seconds(value: str, where: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", value)
    if not match:
        raise SsmlError(f"<break time={value[:20]!r}> at {where}: write the time as 500ms or 1.5s")
    seconds = float(match[1]) / (1000 if match[2] == "ms" else 1)
    if seconds > MAX_BREAK_S:
        raise SsmlError(f"<break time={value[:20]!r}> at {where}: at most {MAX_BREAK_S:g}s")
    return seconds


def _rate(value: str, where: str) -> float:
    value = value.strip()
    if value in RATES:
        return RATES[value]
    match = re.fullmatch(r"([+-]?)(\d+(?:\.\d+)?)(%?)", value)
    if not match:
        raise SsmlError(f"<prosody rate={value[:20]!r}> at {where}: use x-slow…x-fast, a percentage or a number")
    number = float(match[2])
    if match[3] and match[1]:  # "+20%": a change relative to the current rate
        return 1 + (number if match[1] == "+" else -number) / 100
    return number / 100 if match[3] else number


class _Handler(ContentHandler):
    def __init__(self, say_as: SayAs, phonemes: bool) -> None:
        super().__init__()
        self.say_as = say_as
        self.phonemes = phonemes
        self.locator: Locator | None = None
        self.stack: list[_Open] = []
        self.segments: list[Segment] = []
        self.current: list[str] = []
        self.pause: float | None = None  # before the next segment (see `Segment.pause_before`)
        self.seen_root = False
        self.silence = 0.0  # seconds of breaks so far
        self.written: list[str] = []  # the document's text content, words apart where elements part them

    def where(self) -> str:
        if self.locator is None:
            return "?"
        return f"line {self.locator.getLineNumber()}, column {(self.locator.getColumnNumber() or 0) + 1}"

    def setDocumentLocator(self, locator: Locator) -> None:
        self.locator = locator

    # -- segments -------------------------------------------------------------------------------------
    def flush(self, boundary: float | None) -> None:
        """End the current segment at a ``boundary``: None between sentences, 0 inside one."""
        text = " ".join("".join(self.current).split())
        if text:
            top = self.stack[-1] if self.stack else None
            self.segments.append(Segment(text, self.pause, top.rate if top else 1.0, top.language if top else None))
            self.pause = boundary
        elif boundary is None and self.pause == 0.0:
            self.pause = None  # a sentence ends here after all: the usual pause
        self.current = []

    def add_break(self, seconds: float) -> None:
        self.silence += seconds
        if self.silence > MAX_BREAKS_TOTAL_S:
            raise SsmlError(f"<break> at {self.where()}: the breaks add up to more than {MAX_BREAKS_TOTAL_S:g}s")
        self.flush(0.0)
        self.pause = (self.pause or 0.0) + seconds  # breaks in a row add up; a break replaces the usual pause

    # -- SAX ------------------------------------------------------------------------------------------
    def startElement(self, name: str, attrs: AttributesImpl) -> None:
        where = self.where()
        if name in _PARTS_WORDS:
            self.written.append(" ")
        if len(self.stack) >= MAX_DEPTH:
            raise SsmlError(f"<{name}> at {where} is nested more than {MAX_DEPTH} deep")
        if name not in ELEMENTS:
            raise SsmlError(f"<{name}> at {where} is not supported (supported: "
                            f"{', '.join(sorted(ELEMENTS))})")
        if not self.stack:
            if name != "speak" or self.seen_root:
                raise SsmlError(f"<{name}> at {where}: the document must be one <speak> element")
            self.seen_root = True
        elif name == "speak":
            raise SsmlError(f"<speak> at {where} may only be the outermost element")
        top = self.stack[-1] if self.stack else _Open("", 1.0, None)
        if top.say_as or top.alias is not None or top.name == "phoneme":
            raise SsmlError(f"<{name}> at {where}: <{top.name}> holds text only")
        rate, language = top.rate, top.language
        opened = _Open(name, rate, language)
        if name == "speak" and attrs.get("xml:lang"):  # the document's language, as a <lang> around all of it
            opened.language = attrs["xml:lang"]
        if name == "break":
            time, strength = attrs.get("time"), attrs.get("strength")
            if time is not None:
                seconds = _seconds(time, where)
            elif strength is not None:
                if strength not in STRENGTHS:
                    raise SsmlError(f"<break strength={strength[:20]!r}> at {where}: one of {', '.join(STRENGTHS)}")
                seconds = STRENGTHS[strength]
            else:
                seconds = STRENGTHS["medium"]
            self.add_break(seconds)
        elif name in ("p", "s"):
            self.flush(None)
        elif name == "prosody":
            if "rate" not in attrs:
                raise SsmlError(f"<prosody> at {where}: only rate is supported")
            opened.rate = rate * _rate(attrs["rate"], where)
            if not MIN_RATE <= opened.rate <= MAX_RATE:
                raise SsmlError(f"<prosody rate={attrs['rate'][:20]!r}> at {where}: the rate must stay within "
                                f"{MIN_RATE:g}–{MAX_RATE:g}")
            self.flush(0.0)
        elif name == "lang":
            code = attrs.get("xml:lang")
            if not code:
                raise SsmlError(f"<lang> at {where} needs xml:lang")
            opened.language = code
            self.flush(0.0)
        elif name == "say-as":
            kind = attrs.get("interpret-as")
            if kind not in SAY_AS:
                raise SsmlError(f"<say-as interpret-as={str(kind)[:20]!r}> at {where}: one of {', '.join(SAY_AS)}")
            opened.say_as = (kind, attrs.get("format"))
        elif name == "sub":
            if "alias" not in attrs:
                raise SsmlError(f"<sub> at {where} needs alias")
            opened.alias = attrs["alias"]
        elif name == "phoneme" and (attrs.get("alphabet", attrs.get("alph", "ipa")) != "ipa" or "ph" not in attrs):
            raise SsmlError(f"<phoneme> at {where} needs alphabet=\"ipa\" and ph")
        if name == "phoneme":
            if not attrs["ph"].strip() or any(ch in "[]" for ch in attrs["ph"]):
                raise SsmlError(f"<phoneme> at {where}: ph must be IPA, without [ or ]")
            opened.ipa = attrs["ph"].strip()
        self.stack.append(opened)

    def endElement(self, name: str) -> None:
        opened = self.stack.pop()
        if name in _PARTS_WORDS:
            self.written.append(" ")
        if opened.say_as is not None:
            kind, fmt = opened.say_as
            words = self.spell(opened.text) if kind in ("characters", "spell-out") else \
                self.say_as("cardinal" if kind == "number" else kind, opened.text, fmt, opened.language)
            if words is None:
                raise SsmlError(f"<say-as interpret-as=\"{kind}\"> ending at {self.where()}: "
                                f"{opened.text.strip()[:40]!r} is not a {kind} here")
            self.current.append(f" {words} ")
        elif opened.alias is not None:
            self.current.append(f" {opened.alias} ")
        elif name == "phoneme":
            # An engine that takes IPA gets it as [[ … ]]; another speaks the written word.
            self.current.append(f" [[{opened.ipa}]] " if self.phonemes else opened.text)
        elif name in ("p", "s"):
            self.flush(None)
        elif name in ("prosody", "lang", "speak"):
            self.stack.append(opened)  # the segment so far is spoken with this element's rate and language
            self.flush(None if name == "speak" else 0.0)
            self.stack.pop()

    def characters(self, content: str) -> None:
        if not self.stack:
            return
        self.written.append(content)
        top = self.stack[-1]
        if top.say_as or top.alias is not None or top.name == "phoneme":
            top.text += content
        else:
            self.current.append(content)

    @staticmethod
    def spell(text: str) -> str:
        return " ".join(ch for ch in text if not ch.isspace())


def parse(text: str, say_as: SayAs, *, phonemes: bool = False) -> tuple[list[Segment], float, str]:
    """The segments of an SSML document, the pause after the last one and the document's text content as
    written (`Spoken.written`); `SsmlError` when it is refused.

    ``phonemes``: the engine takes IPA as ``[[ … ]]``, so ``<phoneme ph>`` is given to it so.
    """
    handler = _Handler(say_as, phonemes)
    try:
        defusedxml.sax.parseString(text.encode("utf-8"), handler, forbid_dtd=True)
    except defusedxml.DTDForbidden:
        raise SsmlError(f"<!DOCTYPE> at {handler.where()}: document type declarations (and the entities they "
                        "declare) are refused") from None
    except defusedxml.EntitiesForbidden as exc:
        raise SsmlError(f"<!ENTITY {exc.name}> at {handler.where()}: entity declarations are refused") from None
    except defusedxml.ExternalReferenceForbidden:
        raise SsmlError(f"an external reference at {handler.where()} is refused") from None
    except SAXParseException as exc:
        line, column = exc.getLineNumber(), (exc.getColumnNumber() or 0) + 1
        raise SsmlError(f"not well-formed XML at line {line}, column {column}: {exc.getMessage()}") from None
    if not handler.seen_root:
        raise SsmlError("the document must be one <speak> element")
    return handler.segments, handler.pause or 0.0, "".join(handler.written)
