"""Issue 29: what a hostile or sloppy client can send — ambiguous framing, unknown HTTP versions, paths that
alias another resource, descriptions of any size — gets a problem, never another request's answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import fake_cloning_plugin
from tests.conftest import (
    HANG_GUARD_S,
    ROOT,
    assert_problem,
    read_until_closed,
    register,
    running_app,
    uvicorn_server,
    voice_audio,
    wait_for_warm_up,
    wav,
)
from tts_gateway.voices.catalog import MAX_DESCRIPTION_CHARS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real `tts-gateway serve` (uvicorn) with espeak-ng and the cheap cloning engine, and one preset."""
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path_factory.mktemp("data")), "TTS_GATEWAY_ENGINES": "espeak",
           "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en", "TTS_GATEWAY_CANARY": "0",
           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin"}
    with uvicorn_server(env) as base:
        assert register(base, "anna", wav(voice_audio()), engine="clone").status_code == 201
        host, port = base.removeprefix("http://").split(":")
        yield host, int(port)


def exchange(where: tuple[str, int], request: bytes) -> bytes:
    """Send raw bytes, then read everything until the server closes (the socket timeout is the hang guard)."""
    with socket.create_connection(where, timeout=HANG_GUARD_S) as conn:
        conn.sendall(request)
        return read_until_closed(conn)


def problem_of(reply: bytes) -> dict[str, Any]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), head
    problem: dict[str, Any] = json.loads(body)
    return problem


# -- framing (RFC 9112) ------------------------------------------------------------------------------
SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
@pytest.mark.parametrize("order", ["length-first", "chunked-first"])
def test_content_length_with_chunked_is_refused_and_the_smuggled_request_never_answered(
        server: tuple[str, int], version: bytes, order: str) -> None:
    """Both framings on one request (RFC 9112 §6.1): 400, the connection closes, and the request hidden
    in its body (which the chunked framing would read as the next one) gets no answer."""
    body = b"0\r\n\r\n" + SMUGGLED
    framings = [b"Content-Length: %d\r\n" % len(body), b"Transfer-Encoding: chunked\r\n"]
    if order == "chunked-first":
        framings.reverse()
    reply = exchange(server, b"POST /v1/synthesize HTTP/" + version + b"\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n" + b"".join(framings) + b"\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # one answer: nothing for the smuggled GET
    assert b"connection: close" in reply.lower()
    detail = problem_of(reply)["detail"]
    assert "Content-Length" in detail and "Transfer-Encoding" in detail


def test_transfer_encoding_on_http_1_0_is_refused(server: tuple[str, int]) -> None:
    """HTTP/1.0 has no chunked framing (RFC 9112 §6.1: the framing is faulty): 400 and close."""
    body = b"0\r\n\r\n" + SMUGGLED
    reply = exchange(server, b"POST /v1/synthesize HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert "HTTP/1.0" in problem_of(reply)["detail"]


@pytest.mark.parametrize("version", [b"9.9", b"2.0", b"0.9", b"1.2"])
def test_http_versions_other_than_1_0_and_1_1_get_505(server: tuple[str, int], version: bytes) -> None:
    reply = exchange(server, b"GET /health HTTP/" + version + b"\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 505"), reply[:300]
    problem = problem_of(reply)
    assert problem["status"] == 505 and "HTTP/" + version.decode() in problem["detail"]


def test_http_1_0_and_1_1_are_still_served(server: tuple[str, int]) -> None:
    assert exchange(server, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    keep_alive = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert keep_alive.startswith(b"HTTP/1.1 200") and keep_alive.count(b"HTTP/1.1 200") == 2, keep_alive
    body = b'{"text": "hi"}'
    chunked = exchange(server, b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                       + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 200"), chunked[:300]


def test_a_malformed_request_is_a_problem(server: tuple[str, int]) -> None:
    reply = exchange(server, b"GARBAGE\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert problem_of(reply)["status"] == 400


# -- paths that alias another one ----------------------------------------------------------------------
ALIASES = [
    ("GET", "/v1/voices/anna%2F"), ("GET", "/v1/voices/anna%2f"), ("GET", "/v1/voices/anna/"),
    ("DELETE", "/v1/voices/anna%2F"), ("DELETE", "/v1/voices/anna/"), ("GET", "/v1//voices/anna"),
    ("GET", "/v1/engines/espeak%2F"), ("GET", "/v1/engines/espeak/"), ("POST", "/v1/engines/espeak%2Fload"),
    ("POST", "/v1/engines/espeak%2Funload"), ("POST", "/v1/engines/espeak/load/"),
]


@pytest.fixture
def cloning_client(make_settings: Any) -> Iterator[Any]:
    with running_app(make_settings(engines=("espeak",), default_voice="espeak:en"), fake_cloning_plugin) as client:
        wait_for_warm_up(client)
        assert register(client, "anna", wav(voice_audio()), engine="clone").status_code == 201
        yield client


def test_an_encoded_or_trailing_slash_addresses_nothing(cloning_client: Any) -> None:
    """``anna%2F`` or ``anna/`` is not the voice ``anna``: 404 like any unknown name, and nothing changes."""
    assert cloning_client.get("/v1/engines/espeak").json()["loaded"] is True  # the default voice's engine
    for method, path in ALIASES:
        response = cloning_client.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), (method, path)
    assert cloning_client.get("/v1/voices/anna").status_code == 200
    assert cloning_client.get("/v1/engines/espeak").json()["loaded"] is True  # not unloaded by `espeak%2Funload`
    assert cloning_client.get("/v1/voices/").status_code == 200  # a fixed path keeps its lenient slash


def test_an_encoded_or_trailing_slash_addresses_nothing_over_a_real_server(server: tuple[str, int]) -> None:
    """The same over uvicorn, whose URL decoding differs from the test client's."""
    base = f"http://{server[0]}:{server[1]}"
    assert httpx.get(base + "/v1/engines/espeak", timeout=HANG_GUARD_S).json()["loaded"] is True
    for method, path in ALIASES:
        reply = exchange(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                 "Connection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 404"), (method, path, reply[:300])
        problem_of(reply)
    assert httpx.get(base + "/v1/voices/anna", timeout=HANG_GUARD_S).status_code == 200
    assert httpx.get(base + "/v1/engines/espeak", timeout=HANG_GUARD_S).json()["loaded"] is True


# -- descriptions --------------------------------------------------------------------------------------
def test_a_description_is_bounded(cloning_client: Any) -> None:
    clip = wav(voice_audio())
    longest = "d" * MAX_DESCRIPTION_CHARS
    created = register(cloning_client, "longest", clip, engine="clone", description=longest)
    assert created.json()["description"] == longest
    body = assert_problem(register(cloning_client, "huge", clip, engine="clone", description="d" * 1_000_000), 422,
                          "description", str(MAX_DESCRIPTION_CHARS))
    assert body.get("field") == "description" or "description" in body["detail"]
    over = "d" * (MAX_DESCRIPTION_CHARS + 1)
    assert_problem(register(cloning_client, "over", clip, engine="clone", description=over), 422, "description")
    names = {v["name"] for v in cloning_client.get("/v1/voices").json()["voices"]}
    assert "longest" in names and "huge" not in names and "over" not in names


def test_the_cli_bounds_a_description_too(tmp_path: Path) -> None:
    audio = tmp_path / "me.wav"
    audio.write_bytes(wav(voice_audio()))
    env = {**os.environ, "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak",
           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin", "PYTHONPATH": str(ROOT)}
    added = subprocess.run([sys.executable, "-m", "tts_gateway", "voices", "add", "me", str(audio), "--engine", "clone",
                            "--consent", "--description", "d" * (MAX_DESCRIPTION_CHARS + 1)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert added.returncode == 1 and str(MAX_DESCRIPTION_CHARS) in added.stderr, added.stderr
    helped = subprocess.run([sys.executable, "-m", "tts_gateway", "voices", "add", "--help"], capture_output=True,
                            text=True, env={**env, "COLUMNS": "200"}, timeout=300)
    assert f"at most {MAX_DESCRIPTION_CHARS} characters" in helped.stdout, helped.stdout
