"""Issue 5: streaming over a real uvicorn, long text, formats, sample rates and speed."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.conftest import assert_problem, decode, uvicorn_server
from tts_gateway.text import split_sentences

SENTENCES = [f"This is sentence number {n}, spoken by the gateway." for n in range(1, 11)]
TEN = " ".join(SENTENCES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path) -> Iterator[str]:
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path_factory.mktemp("stream-data")),
           "TTS_GATEWAY_ENGINES": "piper,xtts,espeak", "TTS_GATEWAY_XTTS_CHECKPOINT": str(tiny_xtts),
           "TTS_GATEWAY_MAX_CONCURRENCY": "2", "TTS_GATEWAY_ENGINE_THREADS": "1"}
    with uvicorn_server(env) as base:
        yield base


def in_flight(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("tts_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no tts_in_flight metric")


def read_stream(base: str, body: dict[str, Any]) -> tuple[list[bytes], httpx.Headers, float]:
    """Chunks as they arrived, the headers, and how many syntheses were running at the first chunk."""
    chunks: list[bytes] = []
    running_at_first = -1.0
    with httpx.stream("POST", base + "/v1/synthesize", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            if chunk and not chunks:
                running_at_first = in_flight(base)
            if chunk:
                chunks.append(chunk)
        return chunks, response.headers, running_at_first


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_stream_arrives_incrementally_and_matches_whole(server: str, voice: str) -> None:
    body = {"text": TEN, "voice": voice, "seed": 5, "stream": True}
    chunks, headers, running_at_first = read_stream(server, body)
    assert headers["content-type"] == "audio/wav"
    assert headers.get("transfer-encoding") == "chunked"
    assert len(chunks) >= 5  # sentence by sentence, not one blob
    assert running_at_first == 1  # the first bytes left while the synthesis was still running
    streamed, rate = decode(b"".join(chunks))
    whole = httpx.post(server + "/v1/synthesize", json={**body, "stream": False}, timeout=300)
    assert whole.status_code == 200
    full, full_rate = decode(whole.content)
    assert rate == full_rate
    assert streamed.size == full.size
    assert streamed.size / rate > 10 * 1.0  # ten sentences of speech


def test_xtts_streams_within_a_sentence(server: str, speech_wav: bytes) -> None:
    created = httpx.post(server + "/v1/voices", data={"name": "streamer"},
                         files={"audio": ("a.wav", speech_wav, "audio/wav")}, timeout=300)
    assert created.status_code in (201, 409), created.text
    body = {"text": "One sentence only.", "voice": "streamer", "seed": 3, "stream": True, "format": "pcm"}
    chunks, headers, running_at_first = read_stream(server, body)
    assert headers["content-type"].startswith("audio/L16")
    assert headers["x-sample-rate"] == "24000"
    assert len(chunks) >= 2 and running_at_first == 1
    whole = httpx.post(server + "/v1/synthesize", json={**body, "stream": False}, timeout=300)
    assert len(b"".join(chunks)) == len(whole.content)


def test_disconnect_cancels_remaining_work(server: str) -> None:
    long_text = " ".join(SENTENCES * 8)  # 80 sentences: far longer than the test waits
    with httpx.stream("POST", server + "/v1/synthesize", json={"text": long_text, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            if chunk:
                break
        assert in_flight(server) == 1
    # The client is gone: the worker must stop at the next chunk, freeing its slot.
    deadline = time.monotonic() + 20
    while in_flight(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(server) == 0


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [("wav", None), ("wav", 8000), ("flac", 44100), ("mp3", 24000), ("opus", 48000), ("opus", None),
     ("pcm", 16000)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_formats_decode_at_the_requested_rate(server: str, fmt: str, rate: int | None, stream: bool) -> None:
    body: dict[str, Any] = {"text": "Formats are fun.", "format": fmt, "seed": 1, "stream": stream}
    if rate:
        body["sample_rate"] = rate
    response = httpx.post(server + "/v1/synthesize", json=body, timeout=120)
    assert response.status_code == 200, response.text
    expected = rate or {"opus": 48000}.get(fmt, 22050)
    assert response.headers["x-sample-rate"] == str(expected)
    if fmt == "pcm":
        assert response.headers["content-type"] == f"audio/L16;rate={expected};channels=1"
        samples = np.frombuffer(response.content, "<i2")
        assert samples.size / expected > 0.5 and np.abs(samples).max() > 100
        return
    with sf.SoundFile(io.BytesIO(response.content)) as handle:
        assert handle.samplerate == expected
        audio = handle.read(dtype="float32")
    assert audio.size / expected > 0.5 and np.abs(audio).max() > 0.01


def test_speed_changes_duration(server: str) -> None:
    durations = {}
    for speed in (0.5, 1.0, 2.0):
        response = httpx.post(server + "/v1/synthesize", json={"text": "Speed matters a lot.", "speed": speed,
                                                               "seed": 1}, timeout=120)
        assert response.status_code == 200
        audio, rate = decode(response.content)
        durations[speed] = audio.size / rate
    assert durations[0.5] > durations[1.0] * 1.5
    assert durations[2.0] < durations[1.0] * 0.7


@pytest.mark.parametrize(
    ("body", "field"),
    [('"speed": 0.1', "speed"), ('"speed": 5', "speed"), ('"speed": -1', "speed"), ('"speed": 1e999', "out of range"),
     ('"sample_rate": 7999', "sample_rate"), ('"sample_rate": 48001', "sample_rate"),
     ('"format": "opus", "sample_rate": 22050', "sample_rate"), ('"format": "ogg"', "format"),
     ('"seed": -1', "seed")],
)
def test_bad_audio_options(server: str, body: str, field: str) -> None:
    response = httpx.post(server + "/v1/synthesize", content='{"text": "hi", ' + body + "}",
                          headers={"content-type": "application/json"}, timeout=60)
    assert_problem(response, 422, field)


def test_long_text_limit_and_splitting(server: str) -> None:
    long_ok = "Short sentence here. " * 40
    response = httpx.post(server + "/v1/synthesize", json={"text": long_ok, "voice": "espeak:en"}, timeout=300)
    assert response.status_code == 200
    too_long = "x" * 5001
    assert_problem(httpx.post(server + "/v1/synthesize", json={"text": too_long}, timeout=60), 422, "5000")


def test_splitter_knows_cjk_and_keeps_pieces_under_the_limit() -> None:
    assert split_sentences("你好。我是乔。今天天气很好！", "zh-cn", 82) == ["你好。", "我是乔。", "今天天气很好！"]
    assert split_sentences("こんにちは。元気ですか？", "ja", 71) == ["こんにちは。", "元気ですか？"]
    pieces = split_sentences("今" * 300 + "。", "zh-cn", 82)
    assert all(len(p) <= 82 for p in pieces) and "".join(pieces) == "今" * 300 + "。"
    english = split_sentences("Dr. Smith went home. " + "word, " * 100 + "end.", "en", 250)
    assert english[0] == "Dr. Smith went home." and all(len(p) <= 250 for p in english)
    assert split_sentences("Olá. Tudo bem? Sim!", "pt", 203) == ["Olá.", "Tudo bem?", "Sim!"]
