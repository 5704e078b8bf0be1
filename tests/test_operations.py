"""Issue 6: engine listing and lifecycle, languages, espeak-ng, OpenAI compatibility, metrics, CLI."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import (
    assert_problem,
    decode,
    read_until_closed,
    running_app,
    sse_events,
    uvicorn_server,
    voice_audio,
    wait_for_warm_up,
    wait_until,
    wav,
)
from tests.fake_engine import FakeEngine, FakePlugin


def test_languages_cover_every_engine(client: Any) -> None:
    languages = {entry["code"]: entry for entry in client.get("/v1/languages").json()}
    assert languages["en"]["engines"] == ["piper", "espeak"]
    assert languages["en"]["name"] == "English"
    assert len([code for code, entry in languages.items() if "espeak" in entry["engines"]]) >= 100
    assert languages["de"]["engines"] == ["espeak"]


def test_espeak_voices_speak_their_language(client: Any) -> None:
    voices = {v["name"] for v in client.get("/v1/voices").json()["voices"]}
    assert {"espeak:de", "espeak:fr", "espeak:en"} <= voices
    response = client.post("/v1/synthesize", json={"text": "Guten Morgen, wie geht es dir?", "voice": "espeak:de"})
    assert response.status_code == 200, response.text
    assert response.headers["x-engine"] == "espeak"
    audio, rate = decode(response.content)
    assert rate == 22050 and audio.size / rate > 0.5 and np.abs(audio).max() > 0.05
    espeak = client.get("/v1/engines/espeak").json()
    assert espeak["available"] and "GPL" in espeak["model"]["licence"]


def test_unsupported_language_lists_what_the_engine_has(client: Any) -> None:
    body = assert_problem(client.post("/v1/synthesize", json={"text": "Bonjour", "language": "fr"}), 422,
                          "does not speak", "en")
    assert "piper" in body["detail"]


def test_engine_lookup_errors(client: Any) -> None:
    assert_problem(client.get("/v1/engines/nope"), 404, "unknown engine")
    assert_problem(client.post("/v1/engines/nope/load"), 404)


def test_load_unload_and_reload_on_next_request(client: Any) -> None:
    assert client.post("/v1/engines/espeak/load").json()["loaded"] is True
    assert client.post("/v1/engines/piper/unload").json()["loaded"] is False
    assert client.get("/v1/engines/piper").json()["loaded"] is False
    response = client.post("/v1/synthesize", json={"text": "Back again."})
    assert response.status_code == 200
    assert client.get("/v1/engines/piper").json()["loaded"] is True


def test_idle_engines_unload_after_ttl(make_settings: Any) -> None:
    """Used → loaded; idle past the TTL → unloaded; the next request loads it again.

    With a 0.3 s TTL the engine may be reaped again at any moment after a request, so the test counts
    loads (which only grow) instead of checking ``loaded`` right after a request; and it waits for the
    warm-up first, whose own load and possible unload are then behind it.
    """
    engine = FakeEngine()
    settings = make_settings(engines=(), default_voice="fake:one", engine_idle_ttl_s=0.3)
    with running_app(settings, FakePlugin(engine)) as client:
        wait_for_warm_up(client)
        assert client.post("/v1/synthesize", json={"text": "hello"}).status_code == 200
        assert engine.loads >= 1
        wait_until(lambda: not engine.loaded, "the idle engine to be unloaded")
        loads = engine.loads
        assert client.post("/v1/synthesize", json={"text": "hello again"}).status_code == 200
        assert engine.loads == loads + 1  # loaded again for the request


def test_ready_after_canary_and_metrics(client: Any) -> None:
    wait_for_warm_up(client)
    assert client.get("/ready").json()["status"] == "ready"
    client.post("/v1/synthesize", json={"text": "Count me."})
    client.post("/v1/synthesize", json={"text": ""})
    text = client.get("/metrics").text
    for name in ("tts_requests_total", "tts_synthesis_seconds", "tts_time_to_first_audio_seconds",
                 "tts_conditioning_computations_total", "tts_voice_cache_hits_total", "tts_queue_depth",
                 "tts_real_time_factor"):
        assert name in text, name
    assert 'tts_requests_total{engine="piper",status="200"}' in text


def test_ready_says_where_the_default_engine_stands_after_an_unload(client: Any) -> None:
    """Ready means the default voice can be served now: after an unload its engine loads again on the next
    request, so /ready stays 200 and its body says the engine is not loaded, never that it is."""
    wait_for_warm_up(client)
    before = client.get("/ready").json()["detail"]
    assert "engine piper loaded" in before and "piper loaded" in before.split("engines:")[1]
    assert client.post("/v1/engines/piper/unload").status_code == 200
    after = client.get("/ready")
    assert after.status_code == 200, after.text
    detail = after.json()["detail"]
    assert "engine piper is not loaded" in detail and "engine piper loaded" not in detail, detail
    assert client.post("/v1/synthesize", json={"text": "Back."}).status_code == 200
    assert "engine piper loaded" in client.get("/ready").json()["detail"]


def test_not_ready_when_the_default_engine_becomes_unavailable(make_settings: Any, fake_engine: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(engines=(), default_voice="fake:one")
    with running_app(settings, FakePlugin(fake_engine)) as client:
        wait_for_warm_up(client)
        assert client.get("/ready").status_code == 200
        client.post("/v1/engines/fake/unload")
        monkeypatch.setattr(fake_engine, "availability", lambda: (False, "its model file was removed"))
        assert_problem(client.get("/ready"), 503, "engine fake is unavailable now: its model file was removed")


def test_not_ready_when_default_voice_is_unusable(make_settings: Any) -> None:
    with running_app(make_settings(default_voice="xtts:nobody", engines=("piper", "xtts"))) as client:
        wait_for_warm_up(client)  # its outcome, however long the warm-up takes
        assert_problem(client.get("/ready"), 503, "not usable")


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path_factory.mktemp("openai")), "TTS_GATEWAY_ENGINES": "piper,espeak",
           "TTS_GATEWAY_API_KEYS": "sk-test:synthesize", "TTS_GATEWAY_OPENAI_VOICES": "echo=espeak:en"}
    with uvicorn_server(env) as base:
        yield base


def test_openai_sdk_speech(openai_server: str, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=openai_server + "/v1", api_key="sk-test")
    response = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the OpenAI SDK.",
                                          response_format="wav")
    audio, rate = decode(response.content)
    assert rate == 22050 and audio.size / rate > 0.5
    assert response.response.headers["x-voice"] == "piper:joe"

    target = tmp_path / "speech.mp3"
    with client.audio.speech.with_streaming_response.create(model="tts-1-hd", voice="echo",
                                                           input="Streaming with the SDK. Two sentences.") as stream:
        assert stream.headers["x-engine"] == "espeak"
        stream.stream_to_file(target)
    audio, rate = sf.read(target)
    assert audio.size / rate > 0.5

    pcm = client.audio.speech.create(model="piper", voice="nova", input="Raw samples.", response_format="pcm")
    samples = np.frombuffer(pcm.content, "<i2")
    assert pcm.response.headers["x-sample-rate"] == "24000" and samples.size / 24000 > 0.3

    with pytest.raises(openai.UnprocessableEntityError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="x", response_format="aac")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=openai_server + "/v1", api_key="wrong").audio.speech.create(
            model="tts-1", voice="alloy", input="hi")


def test_openai_sdk_reads_speech_events(openai_server: str) -> None:
    """``stream_format="sse"``: the SDK's raw speech stream and its own SSE reader both read the events."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=openai_server + "/v1", api_key="sk-test")
    text = "Events from the SDK. A second sentence follows."
    with client.audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", voice="echo", input=text,
                                                           response_format="pcm", stream_format="sse") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["x-engine"] == "espeak"
        events = sse_events("\n".join(stream.iter_lines()))
    *deltas, done = events
    assert [e["type"] for e in deltas] == ["speech.audio.delta"] * len(deltas) and len(deltas) >= 2
    assert done == {"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert np.frombuffer(pcm, "<i2").size / 24000 > 1.0
    # espeak-ng is deterministic: the raw stream of the same request holds the same audio
    raw = client.audio.speech.create(model="gpt-4o-mini-tts", voice="echo", input=text, response_format="pcm")
    assert raw.content == pcm

    # The SDK's generic SSE reader (what its other streaming endpoints use) parses the same stream.
    body = {"model": "tts-1", "voice": "echo", "input": text, "response_format": "wav", "stream_format": "sse"}
    read = list(client.post("/audio/speech", body=body, cast_to=object, stream=True,
                            stream_cls=openai.Stream[object]))
    assert [e["type"] for e in read][-1] == "speech.audio.done"
    audio, rate = sf.read(io.BytesIO(b"".join(base64.b64decode(e["audio"]) for e in read[:-1])))
    assert audio.size / rate > 1.0
    with pytest.raises(openai.UnprocessableEntityError):
        client.audio.speech.create(model="tts-1", voice="alloy", input="x", stream_format="events")  # type: ignore[arg-type]


def run_cli(*args: str, data_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TTS_GATEWAY_DATA_DIR": str(data_dir), "TTS_GATEWAY_ENGINES": "piper,espeak"}
    return subprocess.run([sys.executable, "-m", "tts_gateway", *args], capture_output=True, text=True, env=env,
                          timeout=300, input=stdin)


def test_cli_help_say_engines_and_voices(tmp_path: Path) -> None:
    helped = run_cli("--help", data_dir=tmp_path)
    assert helped.returncode == 0
    for command in ("serve", "say", "voices", "engines", "dev"):
        assert command in helped.stdout
    out = tmp_path / "hello.flac"
    said = run_cli("say", "Hello from the command line. " * 4, "--out", str(out), data_dir=tmp_path)
    assert said.returncode == 0, said.stderr
    assert "synthesizing" in said.stderr  # progress bar on long text
    audio, rate = sf.read(out)
    assert rate == 22050 and audio.size / rate > 2
    engines = run_cli("engines", data_dir=tmp_path)
    assert engines.returncode == 0 and "piper" in engines.stdout and "espeak" in engines.stdout
    listed = run_cli("voices", "list", "--json", data_dir=tmp_path)
    assert listed.returncode == 0 and "piper:joe" in listed.stdout
    bad = run_cli("say", "", "--out", str(tmp_path / "x.wav"), data_dir=tmp_path)
    assert bad.returncode == 1 and "empty" in bad.stderr
    missing = run_cli("voices", "rm", "nobody", data_dir=tmp_path)
    assert missing.returncode == 1 and "unknown voice" in missing.stderr


def test_cli_voices_add_list_rm(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    clip = tmp_path / "me.wav"
    clip.write_bytes(wav(voice_audio()))
    env_extra = {"TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin", "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper",
               **env_extra}
        return subprocess.run([sys.executable, "-m", "tts_gateway", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    added = cli("voices", "add", "me", str(clip), "--engine", "clone", "--consent")
    assert added.returncode == 0, added.stderr
    assert '"name": "me"' in added.stdout
    again = cli("voices", "add", "me", str(clip), "--engine", "clone", "--consent")
    assert again.returncode == 1 and "already exists" in again.stderr
    unconsented = cli("voices", "add", "you", str(clip), "--engine", "clone")
    assert unconsented.returncode == 1 and "--consent is needed" in unconsented.stderr, unconsented.stderr
    assert "me" in cli("voices", "list").stdout
    out = tmp_path / "me.wav.out.wav"
    said = cli("say", "hello there", "--voice", "me", "--out", str(out))
    assert said.returncode == 0, said.stderr
    assert sf.info(str(out)).duration > 0.3
    checked = cli("registry", "check")
    assert checked.returncode == 0 and '"broken": []' in checked.stdout
    assert cli("voices", "rm", "me").returncode == 0
    import json

    names = [v["name"] for v in json.loads(cli("voices", "list", "--json").stdout)]
    assert "me" not in names and "piper:joe" in names


def test_start_up_summary_names_engines_reasons_and_misspelt_settings(tmp_path: Any) -> None:
    from tts_gateway.config import Settings
    from tts_gateway.core.compose import build_core
    from tts_gateway.core.dispatch import Dispatcher

    env = {"TTS_GATEWAY_PROT": "8002", "TTS_GATEWAY_DATA_DIR": str(tmp_path),
           "TTS_GATEWAY_ENGINES": "piper,xtts", "TTS_GATEWAY_XTTS_CHECKPOINT": str(tmp_path / "missing")}
    core = build_core(Settings.from_env(env), load_entry_points=False)
    try:
        lines = Dispatcher(core).summary()
    finally:
        core.close()
    text = "\n".join(lines)
    assert "http://127.0.0.1:8001" in text and str(tmp_path) in text
    assert "engine piper: available" in text
    assert f"engine xtts: unavailable: TTS_GATEWAY_XTTS_CHECKPOINT={tmp_path / 'missing'} does not exist" in text
    assert "TTS_GATEWAY_PROT is not a setting and is ignored; did you mean TTS_GATEWAY_PORT?" in text


def test_a_port_in_use_names_the_setting_to_change(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TTS_GATEWAY_PORT": str(port),
               "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak",
               "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en"}
        result = subprocess.run([sys.executable, "-m", "tts_gateway", "serve"], env=env, capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "TTS_GATEWAY_PORT" in lines[0], result.stderr


def test_request_headers_are_bounded(tmp_path: Any) -> None:
    """A client cannot park megabytes of headers in the server: past 64 KiB the request is refused."""
    import socket

    from tests.conftest import uvicorn_server

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak",
           "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en", "TTS_GATEWAY_CANARY": "0"}
    with uvicorn_server(env) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
            reply = read_until_closed(conn)
        assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
        with socket.create_connection((host, int(port)), timeout=60) as conn:  # normal headers still work
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_slow_and_silent_clients_are_cut_off(tmp_path: Any) -> None:
    """A connection that sends nothing, trickles its headers, or stalls in its body is closed; others are served.

    The trickling client keeps sending (a byte every 0.2 s), so only a deadline on the whole head can
    close it; without one, the socket's own timeout (the hang guard) would fail the test.
    """
    import socket
    import time

    from tests.conftest import HANG_GUARD_S, uvicorn_server

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak",
           "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en", "TTS_GATEWAY_CANARY": "0",
           "TTS_GATEWAY_HEADER_TIMEOUT_S": "1", "TTS_GATEWAY_BODY_TIMEOUT_S": "1"}
    with uvicorn_server(env) as base:
        address = base.removeprefix("http://").split(":")
        where = (address[0], int(address[1]))
        with socket.create_connection(where, timeout=HANG_GUARD_S) as silent:  # connects, says nothing
            reply = read_until_closed(silent)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"application/problem+json" in reply and b"within 1 s" in reply

        with socket.create_connection(where, timeout=HANG_GUARD_S) as trickle:
            head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
            closed = False
            for byte in head:  # bounded: 10 000 bytes at 0.2 s would be 33 min, the server closes long before
                try:
                    trickle.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                trickle.settimeout(0.2)
                try:
                    if trickle.recv(65536).startswith(b"HTTP/1.1 408"):
                        closed = True
                        break
                except TimeoutError:
                    pass
                trickle.settimeout(HANG_GUARD_S)
            assert closed, "a client trickling its headers kept its connection"

        with socket.create_connection(where, timeout=HANG_GUARD_S) as stalled:  # headers, then half a body
            stalled.sendall(b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"text\": \"hel")
            started = time.monotonic()
            reply = read_until_closed(stalled)  # the server closes: nothing is synthesized for half a request
        assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert time.monotonic() - started < HANG_GUARD_S

        with socket.create_connection(where, timeout=HANG_GUARD_S) as normal:  # a prompt client is served
            normal.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_until_closed(normal).startswith(b"HTTP/1.1 200")


def test_json_bodies_are_bounded_for_text_not_uploads(client: Any) -> None:
    """A JSON body gets room for the longest text, escaped, and no more: not the 20 MB upload limit."""
    from tts_gateway.gateway.requests import json_body_limit

    limit = json_body_limit(5000)
    assert limit < 100_000
    longest = "\U0001F600" * 5000  # 5000 characters, each written as a 12-byte escaped surrogate pair
    body = json.dumps({"text": longest, "voice": "no-such-voice"})
    assert len(body) <= limit
    response = client.post("/v1/synthesize", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 422, "would be spoken")  # the body was read whole and parsed: the text check spoke
    padded = json.dumps({"text": "hi", "voice": "espeak:en", "pad": " " * limit})
    response = client.post("/v1/synthesize", content=padded, headers={"content-type": "application/json"})
    problem = assert_problem(response, 413, str(limit))
    assert "TTS_GATEWAY_MAX_TEXT_CHARS" in problem["detail"]
    speech = client.post("/v1/audio/speech", content=json.dumps({"model": "tts-1", "input": "x" * (limit + 1)}),
                         headers={"content-type": "application/json"})
    assert_problem(speech, 413, "JSON body")


def test_mistakes_get_a_hint_that_goes_one_step_further(client: Any) -> None:
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "joe"}), 404)
    assert "did you mean piper:joe?" in problem["detail"]
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "Guten Tag.", "language": "de"}), 422)
    assert "voices that speak it:" in problem["detail"] and "espeak:de" in problem["detail"]


def test_cli_errors_point_to_cli_commands_and_check_the_output_first(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tts_gateway.cli import app

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,espeak"}
    runner = CliRunner()
    missing = runner.invoke(app, ["say", "hello", "--out", str(tmp_path / "no" / "such" / "x.wav")], env=env)
    assert missing.exit_code == 2 and "its directory does not exist" in missing.output
    assert not (tmp_path / "data").exists()  # refused before anything was built or synthesized
    unknown = runner.invoke(app, ["say", "hello", "--voice", "joe", "--out", str(tmp_path / "x.wav")], env=env)
    assert unknown.exit_code == 1
    assert "tts-gateway voices list" in unknown.output and "did you mean piper:joe?" in unknown.output
