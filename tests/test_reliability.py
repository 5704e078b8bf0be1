"""Issue 7: bad input, keys, overload, faults and crashes — clear problems, nothing lost."""

from __future__ import annotations

import logging
import random
import signal
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import (
    HANG_GUARD_S,
    GatewayProcess,
    app_state,
    assert_problem,
    decode,
    free_port,
    metric,
    register,
    run_threads,
    running_app,
    snapshot,
    voice_audio,
    wait_for_warm_up,
    wait_until,
    wav,
)
from tests.fake_cloning_plugin import FakeCloningEngine
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.config import Settings
from tts_gateway.voices import LocalVoiceRegistry, prepare_reference

RATE = 16000  # the fake cloning engine's


@pytest.fixture(scope="module")
def table_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    data = tmp_path_factory.mktemp("table")
    settings = Settings(data_dir=data, engines=("piper",), max_upload_bytes=2_000_000, max_concurrency=2,
                        timeout_s=60)
    with running_app(settings, FakePlugin(FakeCloningEngine())) as client:
        assert register(client, "taken", wav(voice_audio()), engine="clone").status_code == 201
        yield client, data


GOOD = wav(voice_audio())
J = {"content-type": "application/json"}
TABLE: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # (id, method, path, request kwargs, status, word in detail)
    ("empty-text", "POST", "/v1/synthesize", {"json": {"text": ""}}, 422, "empty"),
    ("whitespace-text", "POST", "/v1/synthesize", {"json": {"text": " \t\n "}}, 422, "empty"),
    ("too-long-ascii", "POST", "/v1/synthesize", {"json": {"text": "a" * 5001}}, 422, "5001 characters"),
    ("too-long-emoji", "POST", "/v1/synthesize", {"json": {"text": "👍🏽" * 5001}}, 422, "5001 characters"),
    ("too-long-combining", "POST", "/v1/synthesize", {"json": {"text": "x\u0301\u0302" * 5001}}, 422,
     "5001 characters"),
    ("control-nul", "POST", "/v1/synthesize", {"json": {"text": "hi\x00there"}}, 422, "control"),
    ("control-bell", "POST", "/v1/synthesize", {"json": {"text": "ding\x07"}}, 422, "control"),
    ("text-int", "POST", "/v1/synthesize", {"json": {"text": 42}}, 422, "str"),
    ("text-null", "POST", "/v1/synthesize", {"json": {"text": None}}, 422, "str"),
    ("text-list", "POST", "/v1/synthesize", {"json": {"text": ["a"]}}, 422, "str"),
    ("body-array", "POST", "/v1/synthesize", {"json": ["text"]}, 422, "object"),
    ("unknown-field", "POST", "/v1/synthesize", {"json": {"text": "hi", "volume": 3}}, 422, "unknown field"),
    ("malformed-json", "POST", "/v1/synthesize", {"content": b'{"text": "hi"', "headers": J}, 400, "malformed"),
    ("not-json", "POST", "/v1/synthesize", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
     "application/json"),
    ("form-to-json", "POST", "/v1/synthesize", {"data": {"text": "hi"}}, 415, "application/json"),
    ("too-large", "POST", "/v1/synthesize", {"content": b'{"text": "' + b"a" * 2_100_000 + b'"}', "headers": J},
     413, "JSON body is limited to"),
    ("unknown-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "nobody"}}, 404, "unknown voice"),
    ("unknown-engine-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "zzz:a"}}, 404, "no engine"),
    ("traversal-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "../etc/passwd"}}, 404,
     "unknown voice"),
    ("dotdot-encoded-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "%2e%2e"}}, 404,
     "unknown voice"),
    ("absolute-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "/etc/passwd"}}, 404,
     "unknown voice"),
    ("nul-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "ta\x00ken"}}, 404, "unknown voice"),
    ("upper-voice", "POST", "/v1/synthesize", {"json": {"text": "hi", "voice": "TAKEN"}}, 404, "unknown voice"),
    ("get-traversal", "GET", "/v1/voices/..%2F..%2Fetc", {}, 404, ""),
    ("get-dotdot", "GET", "/v1/voices/%2e%2e", {}, 404, ""),
    ("delete-traversal", "DELETE", "/v1/voices/..%2Ftaken", {}, 404, ""),
    ("engine-traversal", "GET", "/v1/engines/..%2Fpiper", {}, 404, ""),
    ("language", "POST", "/v1/synthesize", {"json": {"text": "hi", "language": "tlh"}}, 422, "does not speak"),
    ("format", "POST", "/v1/synthesize", {"json": {"text": "hi", "format": "aiff"}}, 422, "format"),
    ("rate-low", "POST", "/v1/synthesize", {"json": {"text": "hi", "sample_rate": 7999}}, 422, "sample_rate"),
    ("rate-high", "POST", "/v1/synthesize", {"json": {"text": "hi", "sample_rate": 96000}}, 422, "sample_rate"),
    ("rate-type", "POST", "/v1/synthesize", {"json": {"text": "hi", "sample_rate": "fast"}}, 422, "int"),
    ("speed-nan", "POST", "/v1/synthesize", {"content": b'{"text": "hi", "speed": NaN}', "headers": J}, 422,
     "finite"),
    ("speed-inf", "POST", "/v1/synthesize", {"content": b'{"text": "hi", "speed": Infinity}', "headers": J}, 422,
     "finite"),
    ("speed-huge", "POST", "/v1/synthesize", {"content": b'{"text": "hi", "speed": 1e999}', "headers": J}, 422,
     "out of range"),
    ("speed-negative", "POST", "/v1/synthesize", {"json": {"text": "hi", "speed": -1}}, 422, "speed"),
    ("speed-zero", "POST", "/v1/synthesize", {"json": {"text": "hi", "speed": 0}}, 422, "speed"),
    ("seed-negative", "POST", "/v1/synthesize", {"json": {"text": "hi", "seed": -5}}, 422, "seed"),
    ("voice-not-audio", "POST", "/v1/voices",
     {"data": {"name": "v1", "engine": "clone"}, "files": {"audio": ("a.wav", b"just text" * 50, "audio/wav")}},
     415, "not an audio file"),
    ("voice-pickle", "POST", "/v1/voices",
     {"data": {"name": "v2", "engine": "clone"},
      "files": {"audio": ("a.wav", b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.", "audio/wav")}},
     415, "not an audio file"),
    ("voice-zip", "POST", "/v1/voices",
     {"data": {"name": "v3", "engine": "clone"}, "files": {"audio": ("a.wav", b"PK\x03\x04" + b"\0" * 64, "a/b")}},
     415, "not an audio file"),
    ("voice-truncated", "POST", "/v1/voices",
     {"data": {"name": "v4", "engine": "clone"}, "files": {"audio": ("a.wav", GOOD[:5000], "audio/wav")}},
     422, "truncated"),
    ("voice-silent", "POST", "/v1/voices",
     {"data": {"name": "v5", "engine": "clone"},
      "files": {"audio": ("a.wav", wav(np.zeros(RATE * 4, np.float32)), "audio/wav")}}, 422, "silent"),
    ("voice-short", "POST", "/v1/voices",
     {"data": {"name": "v6", "engine": "clone"}, "files": {"audio": ("a.wav", wav(voice_audio(1.5)), "audio/wav")}},
     422, "at least 2"),
    ("voice-long", "POST", "/v1/voices",
     {"data": {"name": "v7", "engine": "clone"}, "files": {"audio": ("a.wav", wav(voice_audio(61, rate=8000), 8000),
                                                                     "audio/wav")}}, 422, "limit is 60"),
    ("voice-duplicate", "POST", "/v1/voices",
     {"data": {"name": "taken", "engine": "clone"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 409,
     "already exists"),
    ("voice-bad-name", "POST", "/v1/voices",
     {"data": {"name": "Bad Name", "engine": "clone"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 422, "name"),
    ("voice-traversal-name", "POST", "/v1/voices",
     {"data": {"name": "../evil", "engine": "clone"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 422, "name"),
    ("voice-no-audio", "POST", "/v1/voices", {"data": {"name": "v8", "engine": "clone"}, "files": {"x": ("x", b"")}},
     422, "audio"),
    ("voice-not-cloning", "POST", "/v1/voices",
     {"data": {"name": "v9", "engine": "piper"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 422, "clone"),
    ("voice-unknown-engine", "POST", "/v1/voices",
     {"data": {"name": "v10", "engine": "nope"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 404, "engine"),
    ("voice-language", "POST", "/v1/voices",
     {"data": {"name": "v11", "engine": "clone", "language": "xx"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}},
     422, "does not speak"),
    ("voice-json", "POST", "/v1/voices", {"json": {"name": "v12"}}, 415, "multipart"),
    ("voice-low-rate", "POST", "/v1/voices",
     {"data": {"name": "v13", "engine": "clone"}, "files": {"audio": ("a.wav", wav(voice_audio(4, rate=1000), 1000),
                                                                      "audio/wav")}}, 422, "sample rate"),
    ("voice-name-newline", "POST", "/v1/voices",
     {"data": {"name": "taken\n", "engine": "clone"}, "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 422, "name"),
    ("voice-description-control", "POST", "/v1/voices",
     {"data": {"name": "v14", "engine": "clone", "description": "a\x00b"},
      "files": {"audio": ("a.wav", GOOD, "audio/wav")}}, 422, "control"),
    ("delete-builtin", "DELETE", "/v1/voices/piper:joe", {}, 409, "built-in"),
    ("legacy-json", "POST", "/synthesize", {"json": {"text": "hi"}}, 415, "multipart"),
    ("legacy-no-audio", "POST", "/synthesize", {"data": {"text": "hi"}, "files": {"x": ("x", b"")}}, 422,
     "speaker_audio"),
    ("openai-aac", "POST", "/v1/audio/speech", {"json": {"model": "tts-1", "input": "hi", "response_format": "aac"}},
     422, "aac"),
    ("openai-model", "POST", "/v1/audio/speech", {"json": {"model": "gpt-9", "input": "hi"}}, 422, "model"),
    ("openai-empty", "POST", "/v1/audio/speech", {"json": {"model": "tts-1", "input": ""}}, 422, "empty"),
    ("unknown-route", "GET", "/v2/everything", {}, 404, ""),
    ("wrong-method", "PUT", "/v1/synthesize", {"json": {"text": "hi"}}, 405, ""),
]


@pytest.mark.parametrize(("case", "method", "path", "kwargs", "status", "word"), TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_table(table_client: tuple[Any, Path], case: str, method: str, path: str, kwargs: dict[str, Any],
                         status: int, word: str) -> None:
    client, data = table_client
    before = snapshot(data)
    if "data" in kwargs and path == "/v1/voices":  # each case fails for its own reason, not for lack of consent
        kwargs = {**kwargs, "data": {"consent": "true", **kwargs["data"]}}
    response = client.request(method, path, **kwargs)
    body = assert_problem(response, status, word)
    assert body["detail"]
    assert snapshot(data) == before, f"{case} changed files on disk"


def test_table_is_big_enough() -> None:
    assert len(TABLE) >= 40


def read_head(sock: Any) -> bytes:
    """A raw HTTP response up to the end of its headers (or whatever came before the server closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    return data


def test_upload_over_limit_is_rejected_before_buffering(tmp_path: Path) -> None:
    """A real server answers 413 from the headers alone, and stops a chunked body at the limit."""
    limit = 400_000
    port = free_port()
    server = start_server(tmp_path, port, TTS_GATEWAY_MAX_UPLOAD_BYTES=str(limit))
    process = server.process
    try:
        server.wait_up()
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as sock:
            sock.sendall(b"POST /v1/voices HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
            reply = read_head(sock)  # no body sent at all: the answer comes from the headers
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"application/problem+json" in reply
        # A chunked body a little past the limit, and then nothing more: it never ends (no last chunk). The
        # reply can only come from a server that stopped at the limit, not from one buffering to the end, and
        # it does not matter how quickly it comes: the test reads it only after sending everything.
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as sock:
            sock.sendall(b"POST /v1/voices HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                while sent <= limit:
                    sock.sendall(b"40000\r\n" + b"\0" * 0x40000 + b"\r\n")
                    sent += 0x40000
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may answer and close as soon as the limit is crossed
            reply = read_head(sock)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    finally:
        process.kill()
        process.wait()
        server.stop()  # closes its log


# -- keys ----------------------------------------------------------------------------------------
def test_api_keys_and_scopes(make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    keys = Settings.from_env({"TTS_GATEWAY_API_KEYS": "adm-secret-1:admin,syn-secret-2:synthesize,"
                                                     "voi-secret-3:voices"}).api_keys
    caplog.set_level(logging.DEBUG)
    with running_app(make_settings(api_keys=keys), FakePlugin(FakeCloningEngine())) as client:
        wait_for_warm_up(client)  # else the canary may still hold Piper when the admin unloads it (409 busy)
        assert_problem(client.post("/v1/synthesize", json={"text": "hi"}), 401, "api key")
        bad = client.post("/v1/synthesize", json={"text": "hi"}, headers={"Authorization": "Bearer nope"})
        assert_problem(bad, 401, "not valid")
        assert bad.headers["www-authenticate"] == "Bearer"
        ok = client.post("/v1/synthesize", json={"text": "hi"}, headers={"Authorization": "Bearer syn-secret-2"})
        assert ok.status_code == 200
        assert client.post("/v1/synthesize", json={"text": "hi"}, headers={"X-API-Key": "adm-secret-1"}).status_code \
            == 200
        files = {"audio": ("a.wav", GOOD, "audio/wav")}
        denied = client.post("/v1/voices", data={"consent": "true", "name": "k", "engine": "clone"}, files=files,
                             headers={"Authorization": "Bearer syn-secret-2"})
        assert_problem(denied, 403, "voices")
        created = client.post("/v1/voices", data={"consent": "true", "name": "k", "engine": "clone"}, files=files,
                              headers={"Authorization": "Bearer voi-secret-3"})
        assert created.status_code == 201
        assert_problem(client.post("/v1/engines/piper/unload", headers={"Authorization": "Bearer voi-secret-3"}),
                       403, "admin")
        assert client.post("/v1/engines/piper/unload", headers={"Authorization": "Bearer adm-secret-1"}).status_code \
            == 200
        assert client.get("/v1/voices", headers={"Authorization": "Bearer syn-secret-2"}).status_code == 200
        assert client.get("/health").status_code == 200  # liveness needs no key
    for secret in ("adm-secret-1", "syn-secret-2", "voi-secret-3"):
        assert secret not in caplog.text


# -- admission, timeouts, faults ---------------------------------------------------------------------
def test_queue_full_gives_503_with_retry_after(make_settings: Any) -> None:
    """One slot, one queue place: a third request is refused while the first two are held in place.

    The first synthesis is held at the engine's gate (not slowed by a delay that a stalled test thread
    could outlast), so the slot and the queue place are taken for certain when the third request comes.
    """
    engine = FakeEngine()
    settings = make_settings(engines=(), default_voice="fake:one", max_concurrency=1, max_queue=1)
    with running_app(settings, FakePlugin(engine)) as client:
        gateway = app_state(client)
        wait_for_warm_up(client)  # the canary has come and gone
        engine.gate = threading.Event()
        engine.started.clear()
        engine.max_active = 0
        results: list[Any] = []
        first = threading.Thread(target=lambda: results.append(client.post("/v1/synthesize", json={"text": "a"})))
        first.start()
        assert engine.started.wait(HANG_GUARD_S)
        second = threading.Thread(target=lambda: results.append(client.post("/v1/synthesize", json={"text": "b"})))
        second.start()
        wait_until(lambda: gateway.admission.waiting >= 1, "the second request to queue")
        third = client.post("/v1/synthesize", json={"text": "c"})
        assert_problem(third, 503, "busy")
        assert int(third.headers["retry-after"]) > 0
        engine.gate.set()
        first.join(HANG_GUARD_S)
        second.join(HANG_GUARD_S)
        assert [r.status_code for r in results] == [200, 200]
        assert engine.max_active == 1


def test_timeout_gives_504_and_stops_the_work(make_settings: Any) -> None:
    """The synthesis is held at a gate that never opens: only the timeout's cancellation can end it."""
    engine = FakeEngine()
    engine.gate = threading.Event()  # never set
    engine.chunks_per_piece = 50
    settings = make_settings(engines=(), default_voice="fake:one", timeout_s=0.5, canary=False)
    with running_app(settings, FakePlugin(engine)) as client:
        gateway = app_state(client)
        assert_problem(client.post("/v1/synthesize", json={"text": "slow"}), 504, "TTS_GATEWAY_TIMEOUT_S")
        # The slot is released when the worker thread has really stopped (not when the 504 left), so wait
        # for that rather than expect it at once.
        wait_until(lambda: engine.active == 0 and gateway.admission.running == 0,
                   "the timed-out synthesis to stop and free its slot")
        assert engine.finished_chunks == 0  # stopped at the gate, not run to its end
        engine.gate = None
        engine.chunks_per_piece = 1
        gateway.worker.timeout_s = HANG_GUARD_S  # the recovery request must not race a 0.5 s timeout
        assert client.post("/v1/synthesize", json={"text": "fast"}).status_code == 200


def test_engine_crash_mid_synthesis_is_503_and_recovers(make_settings: Any) -> None:
    engine = FakeEngine()
    engine.fail_after = 1
    engine.fail_once = True
    with running_app(make_settings(engines=(), default_voice="fake:one", canary=False), FakePlugin(engine)) as client:
        assert_problem(client.post("/v1/synthesize", json={"text": "boom"}), 503, "failed during synthesis")
        assert client.post("/v1/synthesize", json={"text": "fine"}).status_code == 200


def test_concurrent_create_and_delete_of_one_name(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    engine = FakeCloningEngine()
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def create(index: int) -> None:
        reference = prepare_reference([("a.wav", wav(voice_audio(pitch=200 + index)))], RATE)
        barrier.wait()
        try:
            registry.create("race", engine="clone", reference=reference, compute=engine.compute_latents,
                            model_id="m", model_sha256="0" * 64, licence="x")
            outcomes.append("created")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    run_threads(6, create)
    assert outcomes.count("created") == 1 and outcomes.count("VoiceExists") == 5
    deleted: list[str] = []

    def remove(_index: int) -> None:
        try:
            registry.delete("race")
            deleted.append("deleted")
        except Exception as exc:
            deleted.append(type(exc).__name__)

    run_threads(4, remove)
    assert deleted.count("deleted") == 1 and deleted.count("VoiceNotFound") == 3
    report = registry.check(fix=True)
    assert report["broken"] == []
    assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}


# -- processes: SIGTERM drain, SIGKILL crash safety --------------------------------------------------------
def start_server(data: Path, port: int, **env: str) -> GatewayProcess:
    """A real server with Piper and the fake cloning engine (the suite's one launcher, preset for these tests)."""
    return GatewayProcess({"TTS_GATEWAY_DATA_DIR": str(data), "TTS_GATEWAY_ENGINES": "piper",
                           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin", "TTS_GATEWAY_CANARY": "0", **env}, port)


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    """SIGTERM while a synthesis is held in place: the server stops accepting, finishes it, then exits.

    The synthesis waits at a gate word until the test has seen the server stop listening, so the signal
    lands mid-request by construction, however fast or slow the machine.
    """
    gates = tmp_path / "gates"
    gates.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path / "data", port, FAKE_GATE_DIR=str(gates))
    process = server.process
    try:
        server.wait_up()
        assert register(base, "drain", GOOD, engine="clone").status_code == 201
        result: list[httpx.Response] = []
        words = " ".join(["word", "wait-for-drain", *["word"] * 6])  # 8 chunks; held at the second
        worker = threading.Thread(target=lambda: result.append(
            httpx.post(base + "/v1/synthesize", json={"text": words, "voice": "drain"}, timeout=HANG_GUARD_S)))
        worker.start()
        wait_until(lambda: metric(base, "tts_in_flight") == 1, "the synthesis to start")
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: server.refuses_connections(), "the server to stop accepting connections after SIGTERM")
        assert process.poll() is None and not result  # draining: the request is still held at the gate
        (gates / "drain").touch()
        worker.join(HANG_GUARD_S)
        assert result and result[0].status_code == 200
        audio, _rate = decode(result[0].content)
        assert audio.size == 8 * (RATE // 5)
        assert process.wait(HANG_GUARD_S) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.stop()  # closes its log


KILLS = 10  # SIGKILLs that must land inside a registration; each costs a server start
LATENT_S = 0.2  # FAKE_LATENT_DELAY: a registration lasts at least this long, on any machine


@pytest.mark.slow  # a dozen or more server starts
def test_sigkill_during_registrations_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """SIGKILL the server inside voice registrations, again and again; every acknowledged voice survives.

    Each server life registers one or two voices to the end (timing them: the yardstick of how long a
    registration takes on this machine, now), then starts one more and schedules the kill off that
    request's start: half the time within its first LATENT_S (the fake engine's latent computation, so
    the kill lands inside the request however fast or slow the machine is), half over the rest of the
    measured duration, where the blob and the index are written (such a kill may land just after the 201:
    that voice is acknowledged and must survive too). The loop runs until KILLS kills have cut a
    registration short, bounded by a number of server lives and a time guard.
    """
    rng = random.Random(1234)
    acknowledged: dict[str, str] = {}
    durations: list[float] = []
    cut_short = after_ack = lives = 0
    give_up = time.monotonic() + 4 * HANG_GUARD_S
    counter = iter(range(1, 10_000))

    def next_voice() -> tuple[str, bytes]:
        index = next(counter)
        return f"v{index:03d}", wav(voice_audio(pitch=150 + index))

    while cut_short < KILLS:
        assert lives < 4 * KILLS and time.monotonic() < give_up, (
            f"only {cut_short} of {KILLS} kills landed inside a registration in {lives} server lives "
            f"({after_ack} landed after the 201)")
        lives += 1
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(tmp_path, port, FAKE_LATENT_DELAY=str(LATENT_S))
        process = server.process
        killer: threading.Timer | None = None
        try:
            server.wait_up()
            for _ in range(rng.randint(1, 2)):  # run to the end: acknowledged, and the yardstick
                name, audio = next_voice()
                started = time.monotonic()
                response = register(base, name, audio, engine="clone")
                assert response.status_code == 201, response.text
                durations.append(time.monotonic() - started)
                acknowledged[name] = response.json()["voice_sha256"]
            name, audio = next_voice()
            expected = max(statistics.median(durations), LATENT_S)
            delay = rng.uniform(0, LATENT_S) if rng.random() < 0.5 else rng.uniform(LATENT_S, expected)
            killer = threading.Timer(delay, process.kill)
            killer.start()  # the request starts now: the kill is scheduled off its start
            try:
                response = register(base, name, audio, engine="clone")
            except httpx.TransportError:
                cut_short += 1  # killed mid-request: never acknowledged
            else:
                assert response.status_code == 201, response.text
                acknowledged[name] = response.json()["voice_sha256"]
                after_ack += 1
            killer.join()
            assert process.wait(HANG_GUARD_S) == -signal.SIGKILL
        finally:
            if killer is not None:
                killer.cancel()
            if process.poll() is None:
                process.kill()
            process.wait()
            server.stop()  # closes its log
    print(f"{lives} server lives: {cut_short} kills inside a registration, {after_ack} just after a 201; "
          f"{len(acknowledged)} voices acknowledged; a registration took {statistics.median(durations):.3f} s")
    assert len(acknowledged) >= KILLS  # something to lose: every life acknowledged one or two voices first

    registry = LocalVoiceRegistry(tmp_path)
    report = registry.check()
    assert report["broken"] == []
    listed = {r.name: r for r in registry.records()}
    assert set(acknowledged) <= set(listed)
    for name, sha in acknowledged.items():
        assert listed[name].voice_sha256 == sha, name
    for name in listed:  # nothing half-written is visible: every listed voice verifies
        registry.latents(listed[name])
    registry.check(fix=True)
    assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}
    registry.close()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    process = server.process
    try:
        server.wait_up()
        for name, sha in acknowledged.items():
            response = httpx.post(base + "/v1/synthesize", json={"text": "still here", "voice": name},
                                  timeout=HANG_GUARD_S)
            assert response.status_code == 200, (name, response.text)
            assert response.headers["x-voice-sha256"] == sha
    finally:
        process.terminate()
        process.wait(HANG_GUARD_S)
        server.stop()  # closes its log
