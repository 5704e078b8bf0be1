"""The spoken words of the text front end map back to the words as written (`core.word_map`), measured on
the normalization table of every language."""

from __future__ import annotations

import itertools

import pytest

from tests.test_text_normalize import TABLE
from tts_gateway.core.frontend import prepare
from tts_gateway.core.frontend.normalize import normalize
from tts_gateway.core.word_map import build_word_map
from tts_gateway.engines.timing import WordTiming, input_words
from tts_gateway.voices.lexicon import LexiconEntry

# German says "15:45 Uhr" as "fünfzehn Uhr fünfundvierzig": the written words come out in another order, so
# the two share the span of all three.
REORDERED = {"Um 15:45 Uhr.", "Um 15:00 Uhr."}


def heard(pieces: list[str]) -> list[WordTiming]:
    """One second per spoken word, as an engine would time them."""
    words = [word.text for piece in pieces for word in input_words(piece)]
    return [WordTiming(word, float(n), n + 1.0) for n, word in enumerate(words)]


@pytest.mark.parametrize(("language", "written", "spoken"), TABLE, ids=[f"{r[0]}-{r[1][:24]}" for r in TABLE])
def test_every_written_word_is_one_entry_spanning_its_spoken_words(language: str, written: str, spoken: str) -> None:
    words = build_word_map(written, [spoken], lambda word: normalize(word, language))
    reader = words.reader()
    spans = [*reader.feed(heard([spoken])), *reader.end_piece(0), *reader.finish()]
    assert [span.text for span in spans] == [word.text for word in input_words(written)]
    for earlier, later in itertools.pairwise(spans):
        assert earlier.end <= later.start + 1e-9
    assert spans[0].start == 0 and spans[-1].end == len(input_words(spoken))
    shared = [group for group in words.groups if group.end - group.first > 1]
    assert bool(shared) == (written in REORDERED)
    assert words.sentences == (" ".join(written.split()),)


def test_words_come_out_once_their_last_spoken_word_is_heard() -> None:
    """A stream's words lag while a written word's spoken run is unfinished, and every one comes out."""
    pieces = ["It costs one thousand two hundred dollars.", "Doctor Lee paid."]
    words = build_word_map("It costs $1,200. Dr. Lee paid.", pieces, lambda word: prepare(word, "en").text)
    spoken = heard(pieces)
    reader = words.reader()
    assert [w.text for w in reader.feed(spoken[:4])] == ["It", "costs"]
    assert reader.feed(spoken[4:6]) == ()  # "$1,200" is still being said
    assert [(w.text, w.start, w.end) for w in reader.feed(spoken[6:7])] == [("$1,200", 2, 7)]
    assert reader.end_piece(0) == ()
    assert [w.text for w in reader.feed(spoken[7:])] == ["Dr", "Lee", "paid"]
    assert reader.end_piece(1) == reader.finish() == ()
    # An engine that reports fewer words than a piece has: the piece's words still come out at its end,
    # and the next piece's words are read in step.
    short = words.reader()
    assert [w.text for w in short.feed(spoken[:5])] == ["It", "costs"]
    assert [(w.text, w.start, w.end) for w in short.end_piece(0)] == [("$1,200", 2, 5)]
    assert [w.text for w in short.feed(spoken[7:])] == ["Dr", "Lee", "paid"]
    assert words.sentences == ("It costs $1,200.", "Dr. Lee paid.")


def test_a_lexicon_respelling_is_a_known_pair() -> None:
    """A respelled word anchors like an identical one: "nginx" spoken "engine x" is one entry."""
    entries = {"nginx": LexiconEntry("nginx", "en", respelling="engine x")}
    spoken = prepare("Run nginx and 2 apps.", "en", lexicon=lambda _: entries).text
    words = build_word_map("Run nginx and 2 apps.", [spoken],
                           lambda word: prepare(word, "en", lexicon=lambda _: entries).text)
    reader = words.reader()
    spans = [*reader.feed(heard([spoken])), *reader.finish()]
    assert [(s.text, s.start, s.end) for s in spans] == [
        ("Run", 0, 1), ("nginx", 1, 3), ("and", 3, 4), ("2", 4, 5), ("apps", 5, 6)]


def test_a_long_rewrite_is_still_one_entry() -> None:
    """A written word said as more words than the alignment looks ahead (a long <sub> alias) still spans
    them all, and the words after it keep their own."""
    alias = " ".join(f"word{n}" for n in range(40))
    spoken = f"Call {alias} now, please."
    words = build_word_map("Call W3C now, please.", [spoken], lambda word: word)
    reader = words.reader()
    spans = [(s.text, s.start, s.end) for s in (*reader.feed(heard([spoken])), *reader.finish())]
    assert spans == [("Call", 0, 1), ("W3C", 1, 41), ("now", 41, 42), ("please", 42, 43)]
