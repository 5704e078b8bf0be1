"""Issue 32, OpenAI part: ``POST /v1/audio/speech`` with ``"stream_format": "sse"`` sends OpenAI's
``speech.audio.delta`` / ``speech.audio.done`` events; ``"audio"`` (the default) the raw stream.
The `openai` SDK reading the events from a real server is in test_operations.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_problem, decode, running_app, sse_events, wait_for_warm_up
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.engines.base import SynthesisOptions, VoiceInput

SPEECH = {"model": "tts-1", "voice": "espeak:en", "input": "The first sentence. And a second one, a little longer."}
USAGE_KEYS = {"input_tokens", "output_tokens", "total_tokens"}


def audio_of(response: Any) -> bytes:
    """The audio of an SSE answer, checked event by event: deltas with base64 audio, then one ``done``."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    *deltas, done = events
    assert deltas, events
    for delta in deltas:
        assert set(delta) == {"type", "audio"} and delta["type"] == "speech.audio.delta"
    assert done["type"] == "speech.audio.done" and set(done) == {"type", "usage"}
    assert set(done["usage"]) == USAGE_KEYS and all(isinstance(v, int) for v in done["usage"].values())
    return b"".join(base64.b64decode(delta["audio"], validate=True) for delta in deltas)


@pytest.fixture
def uncached(make_settings: Any) -> Iterator[Any]:
    """The real app without the phrase cache: every request really runs the (deterministic) espeak-ng engine."""
    with running_app(make_settings(cache_bytes=0)) as client:
        wait_for_warm_up(client)
        yield client


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "mp3"])
def test_sse_deltas_join_to_the_raw_stream(uncached: Any, fmt: str) -> None:
    body = {**SPEECH, "response_format": fmt}
    raw = uncached.post("/v1/audio/speech", json={**body, "stream_format": "audio"})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("audio/")
    assert uncached.post("/v1/audio/speech", json=body).content == raw.content  # "audio" is the default
    events = uncached.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert events.headers["x-engine"] == "espeak" and events.headers["x-voice"] == "espeak:en"
    assert events.headers["x-cache"] == "miss"
    assert audio_of(events) == raw.content
    if fmt == "pcm":  # streamed as it is made: a piece per sentence at least
        assert len(sse_events(events.text)) >= 3
        assert np.frombuffer(raw.content, "<i2").size / 24000 > 1.0
    else:
        assert decode(raw.content)[0].size > 0


def test_sse_from_the_phrase_cache(client: Any) -> None:
    """A cached phrase is sent as events too: the same audio as the synthesis that filled the cache."""
    body = {**SPEECH, "response_format": "wav", "stream_format": "sse"}
    first = client.post("/v1/audio/speech", json=body)
    again = client.post("/v1/audio/speech", json=body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    audio, rate = decode(audio_of(again))
    assert audio_of(again) == audio_of(first) and audio.size / rate > 1.0


def test_openapi_documents_stream_format_and_the_events(fake_client: Any) -> None:
    document = fake_client.get("/openapi.json").json()
    ok = document["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]
    data = ok["content"]["text/event-stream"]["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    events = data["contentSchema"]["oneOf"]
    kinds = {event["properties"]["type"]["enum"][0]: event for event in events}
    assert set(kinds) == {"speech.audio.delta", "speech.audio.done", "error"}
    assert set(kinds["speech.audio.done"]["properties"]["usage"]["required"]) == USAGE_KEYS
    assert kinds["speech.audio.delta"]["required"] == ["audio", "type"]
    body = document["components"]["schemas"]["SpeechBody"]["properties"]["stream_format"]
    assert body["enum"] == ["audio", "sse", None]  # null (or leaving it out) is the default, "audio"


@pytest.mark.parametrize("value", ["SSE", "events", "", 1, True])
def test_bad_stream_format_is_422(fake_client: Any, value: Any) -> None:
    response = fake_client.post("/v1/audio/speech", json={"input": "hi", "stream_format": value})
    assert_problem(response, 422, "stream_format", *(["audio, sse"] if isinstance(value, str) else []))


def test_null_stream_format_is_the_raw_stream(fake_client: Any) -> None:
    body = {"input": "hi", "stream_format": None, "response_format": "wav"}
    response = fake_client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("audio/wav")


class FailsAfterFirstSentence(FakeEngine):
    """Speaks the first sentence, then crashes on the second (``fail_once``: the next request is fine)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("fake engine crashed on the second sentence")
        return super().synthesize(text, voice, options)


def test_sse_ends_with_an_error_event_when_the_engine_fails_after_its_first_audio(make_settings: Any) -> None:
    """The status (200) has left with the first sentence's audio: the failure is the last event, never ``done``."""
    engine = FailsAfterFirstSentence()
    settings = make_settings(engines=(), default_voice="fake:one", canary=False, cache_bytes=0)
    with running_app(settings, FakePlugin(engine)) as client:
        body = {"input": "One sentence. Then another one.", "response_format": "pcm", "stream_format": "sse"}
        response = client.post("/v1/audio/speech", json=body)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        *deltas, last = sse_events(response.text)
        assert deltas and all(event["type"] == "speech.audio.delta" for event in deltas)
        assert last["type"] == "error" and set(last["error"]) == {"type", "code", "message", "param"}
        assert last["error"]["code"] == "synthesis_ended_early" and "TTS_GATEWAY_TIMEOUT_S" in last["error"]["message"]
        assert engine.calls == 2
        # the openai SDK's own stream reader raises the error event as an APIError, after the audio
        openai = pytest.importorskip("openai")
        httpx2 = pytest.importorskip("httpx2")  # the HTTP client this openai release is built on
        sent = httpx2.Response(200, content=response.content, headers={"content-type": "text/event-stream"},
                               request=httpx2.Request("POST", "http://gateway/v1/audio/speech"))
        read = openai.Stream(cast_to=object, response=sent, client=openai.OpenAI(api_key="-", base_url="http://gateway"))
        seen: list[str] = []
        with pytest.raises(openai.APIError, match="TTS_GATEWAY_TIMEOUT_S") as raised:
            for event in read:
                seen.append(event["type"])
        assert seen == ["speech.audio.delta"] * len(deltas)
        assert raised.value.code == "synthesis_ended_early"
        # the next request runs to its end
        assert audio_of(client.post("/v1/audio/speech", json=body))
        assert engine.calls == 4


def test_voice_as_an_object_with_an_id(uncached: Any) -> None:
    """The `openai` SDK sends a saved voice as ``{"id": ...}``: the same voice as its name; a wrong shape is a 422."""
    by_name = uncached.post("/v1/audio/speech", json={**SPEECH, "response_format": "wav"})
    by_id = uncached.post("/v1/audio/speech", json={**SPEECH, "voice": {"id": SPEECH["voice"]},
                                                    "response_format": "wav"})
    assert by_id.status_code == 200 and by_id.content == by_name.content
    assert_problem(uncached.post("/v1/audio/speech", json={**SPEECH, "voice": {"name": "espeak:en"}}), 422)
    assert_problem(uncached.post("/v1/audio/speech", json={**SPEECH, "voice": {"id": "nobody-here"}}), 404)
