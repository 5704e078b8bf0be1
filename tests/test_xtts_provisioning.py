"""Issue 15: XTTS v2 through coqui-tts's own model manager, from a fake Hugging Face endpoint on 127.0.0.1.

The fake hub implements the few routes ``huggingface_hub.snapshot_download`` calls (model info, the
recursive tree listing, HEAD/GET ``resolve`` with Range) and serves the tiny checkpoint's files as
repository ``tts-hub/XTTS-v2``, plus files coqui's ``ignore`` patterns exclude. It can throttle, drop a
connection mid-file, or refuse. The gateway and the CLI run as real processes with HF_ENDPOINT, HF_HOME
and TTS_HOME pointed at it and at temporary folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    HANG_GUARD_S,
    LocalHttpServer,
    QuietHandler,
    app_state,
    assert_problem,
    decode,
    free_port,
    running_app,
    uvicorn_server,
    wait_for_warm_up,
    wait_until,
)
from tts_gateway.engines import xtts_models
from tts_gateway.engines.base import EngineUnavailable
from tts_gateway.engines.xtts_engine import XttsEngine

pytestmark = pytest.mark.xtts

REPO = "tts-hub/XTTS-v2"
COMMIT = "5a1f0c7e3b9d2c4e6f8a0b1c3d5e7f9a1b3c5d7e"
TOS = "tts_models--multilingual--multi-dataset--xtts_v2/tos_agreed.txt"
CHUNK = 1 << 20


class FakeHub(LocalHttpServer):
    """A Hugging Face endpoint serving one model repository from local files (thread-safe knobs)."""

    def __init__(self, files: dict[str, Path | bytes]) -> None:
        self.blobs: dict[str, bytes | Path] = dict(files)
        self.meta: dict[str, tuple[int, str]] = {}
        for name, content in self.blobs.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            self.meta[name] = (len(data), hashlib.sha256(data).hexdigest())
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.throttle_s = 0.0  # sleep per MiB sent
        self.drop: dict[str, int] = {}  # file → bytes sent before the connection is cut (then `refuse` applies)
        self.drop_once = False  # after one cut, serve normally (the client resumes with Range)
        self.refuse: set[str] = set()  # files answered 503
        self.lock = threading.Lock()
        hub = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        super().__init__(Handler)

    def heal(self) -> None:
        with self.lock:
            self.drop.clear()
            self.refuse.clear()
            self.drop_once = False
            self.throttle_s = 0.0

    def fetched(self, name: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + name)]

    # -- routes ---------------------------------------------------------------------------------------
    def handle(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.requests.append((request.command, path, request.headers.get("Range")))
        if path == f"/api/models/{REPO}/revision/main":
            return self.json(request, {"id": REPO, "sha": COMMIT, "private": False, "gated": False,
                                       "siblings": [{"rfilename": name} for name in self.blobs]})
        if path == f"/api/models/{REPO}/tree/{COMMIT}":
            entries = []
            for name, (size, sha) in self.meta.items():
                entry: dict[str, Any] = {"type": "file", "path": name, "size": size,
                                         "oid": hashlib.sha1(sha.encode()).hexdigest()}
                if name.endswith(".pth"):
                    entry["lfs"] = {"oid": sha, "size": size, "pointerSize": 134}
                entries.append(entry)
            return self.json(request, entries)
        match = re.fullmatch(rf"/{REPO}/resolve/([^/]+)/(.+)", path)
        if match and match.group(1) in ("main", COMMIT) and match.group(2) in self.blobs:
            return self.file(request, match.group(2), head)
        body = json.dumps({"error": "not found"}).encode()
        request.send_response(404)
        request.send_header("X-Error-Code", "EntryNotFound" if match else "RepoNotFound")
        request.send_header("X-Repo-Commit", COMMIT)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def json(self, request: BaseHTTPRequestHandler, value: Any) -> None:
        body = json.dumps(value).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def file(self, request: BaseHTTPRequestHandler, name: str, head: bool) -> None:
        size, sha = self.meta[name]
        common = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        if name.endswith(".pth"):
            common.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size)})
        with self.lock:
            refused = name in self.refuse
            cut = self.drop.get(name)
            if cut is not None and not head:
                if self.drop_once:
                    del self.drop[name]
                else:
                    self.refuse.add(name)  # the retry that follows the cut is refused: the transfer fails
        if refused and not head:
            request.send_response(503)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        start = 0
        ranged = request.headers.get("Range")
        if ranged and not head:
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1))  # type: ignore[union-attr]
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            request.send_response(200)
        for key, value in common.items():
            request.send_header(key, value)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(size - start))
        request.end_headers()
        if head:
            return
        content = self.blobs[name]
        with (content.open("rb") if isinstance(content, Path) else _BytesReader(content)) as handle:
            handle.seek(start)
            sent = 0
            while True:
                block = handle.read(CHUNK)
                if not block:
                    break
                if cut is not None and sent + len(block) >= cut:
                    request.wfile.write(block[: max(cut - sent, 0)])
                    request.wfile.flush()
                    request.connection.shutdown(socket.SHUT_RDWR)  # mid-file: the connection just ends
                    request.close_connection = True
                    return
                request.wfile.write(block)
                sent += len(block)
                if self.throttle_s:
                    time.sleep(self.throttle_s)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def __enter__(self) -> _BytesReader:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, count: int) -> bytes:
        block = self.data[self.pos: self.pos + count]
        self.pos += len(block)
        return block


@pytest.fixture
def hub(tiny_xtts: Path) -> Iterator[FakeHub]:
    files: dict[str, Path | bytes] = {name: tiny_xtts / name for name in
                                      ("config.json", "model.pth", "vocab.json", "speakers_xtts.pth")}
    files.update({"README.md": b"# XTTS-v2 (fake)\n", "dvae.pth": b"\0" * 4096,  # coqui ignores dvae.pth, samples/*
                  "samples/en_sample.wav": b"RIFF" + b"\0" * 64})
    server = FakeHub(files)
    yield server
    server.close()


@pytest.fixture
def hub_env(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a gateway or CLI process: the fake endpoint, fresh caches, no licence yet."""
    for variable in ("COQUI_TOS_AGREED", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN",
                     "TTS_GATEWAY_ACCEPT_CPML", "TTS_GATEWAY_XTTS_CHECKPOINT", "XDG_DATA_HOME"):
        monkeypatch.delenv(variable, raising=False)
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "TTS_HOME": str(tmp_path / "tts-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_DOWNLOAD_TIMEOUT": "30",
            "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,xtts",
            "TTS_GATEWAY_CANARY": "0", "TTS_GATEWAY_ENGINE_THREADS": "2", "TTS_GATEWAY_TIMEOUT_S": "300"}


def poll_engine(base: str, until: Callable[[dict[str, Any]], bool], seen: list[str] | None = None,
                what: str = "the engine state") -> dict[str, Any]:
    state: dict[str, Any] = {}

    def check() -> bool:
        nonlocal state
        state = httpx.get(base + "/v1/engines/xtts", timeout=30).json()
        if seen is not None and state.get("reason"):
            seen.append(state["reason"])
        return until(state)

    wait_until(check, what, timeout=2 * HANG_GUARD_S, interval=0.2)
    return state


def model_snapshot(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / "models--tts-hub--XTTS-v2" / "snapshots" / COMMIT


# -- the model entry, the licence, the cache probe (in-process, no network) -----------------------------------
def test_model_entry_and_folders_are_coquis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.io import get_user_data_dir

    entry = xtts_models.coqui_model()
    assert entry.repo_id == REPO and entry.tos_required and entry.licence == "CPML"
    assert entry.ignore is not None and "dvae.pth" in entry.ignore
    for variables in ({"TTS_HOME": str(tmp_path / "a")}, {"XDG_DATA_HOME": str(tmp_path / "b")}, {}):
        monkeypatch.delenv("TTS_HOME", raising=False)
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
        for key, value in variables.items():
            monkeypatch.setenv(key, value)
        assert xtts_models.coqui_data_dir() == get_user_data_dir("tts")


@pytest.fixture
def isolated_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's view of the caches: empty temporary ones, no licence accepted."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TTS_HOME", str(tmp_path / "tts-home"))
    monkeypatch.delenv("COQUI_TOS_AGREED", raising=False)
    return tmp_path


def test_without_the_licence_xtts_says_exactly_what_to_set(isolated_hub_cache: Path, make_settings: Any,
                                                         speech_wav: bytes) -> None:
    engine = XttsEngine(None)
    ok, reason = engine.availability()
    assert not ok and reason
    for words in ("Coqui Public Model License", "TTS_GATEWAY_ACCEPT_CPML=1",
                  "tts-gateway models pull xtts --accept-license", "TTS_GATEWAY_XTTS_CHECKPOINT"):
        assert words in reason
    with running_app(make_settings(engines=("piper", "xtts"), accept_cpml=False)) as client:
        described = client.get("/v1/engines/xtts").json()
        assert described["available"] is False and described["reason"] == reason
        problem = assert_problem(client.post("/synthesize", data={"text": "Hello."},
                                             files={"speaker_audio": ("a.wav", speech_wav, "audio/wav")}),
                                 503, "TTS_GATEWAY_ACCEPT_CPML=1")
        assert problem["type"].endswith("engine-unavailable")
        assert_problem(client.post("/v1/engines/xtts/load"), 503, "models pull xtts --accept-license")
        assert not [v for v in client.get("/v1/voices").json()["voices"] if v["engine"] == "xtts"]
    # coqui's own marks count as acceptance too (never its input() prompt)
    (isolated_hub_cache / "tts-home" / "tts" / TOS).parent.mkdir(parents=True)
    (isolated_hub_cache / "tts-home" / "tts" / TOS).write_text(xtts_models.TOS_TEXT)
    ok, reason = XttsEngine(None).availability()
    assert "Coqui Public Model License" not in (reason or "")


def test_accepted_but_unreachable_hub_is_unavailable_and_every_place_says_so(
        isolated_hub_cache: Path, make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No model and no hub (a failed pull, no network): unavailable with the reason and when it is checked
    again — in /v1/engines, the start-up summary and /ready's body — and the 503's Retry-After says the same."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    settings = make_settings(engines=("piper", "xtts"), accept_cpml=True)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        described = client.get("/v1/engines/xtts").json()
        assert described["available"] is False, described
        assert "cannot be reached" in described["reason"] and "Connection refused" in described["reason"]
        problem = client.post("/v1/engines/xtts/load")
        body = assert_problem(problem, 503, "cannot be reached")
        seconds = re.search(r"checked again in (\d+) s", body["detail"])
        assert seconds and problem.headers["retry-after"] == seconds.group(1), (problem.headers, body["detail"])
        assert_problem(client.post("/v1/synthesize", json={"text": "Hi.", "voice": "xtts:ana-florence"}), 503,
                       "cannot be reached")
        ready = client.get("/ready")
        assert ready.status_code == 200  # the default voice (Piper) is served
        assert "xtts unavailable (XTTS v2 is not downloaded and" in ready.json()["detail"]
        summary = app_state(client).summary()
        assert any(line.startswith("engine xtts: unavailable:") and "cannot be reached" in line for line in summary)


def test_offline_without_a_cached_model_says_so(isolated_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ok, reason = XttsEngine(None, accept_licence=True).availability()
    assert not ok and reason and "HF_HUB_OFFLINE=1" in reason


def test_a_failed_download_is_unavailable_until_its_retry_and_the_503_says_when(
        isolated_hub_cache: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the download's child process
    monkeypatch.setenv("HF_HOME", str(isolated_hub_cache / "hf"))
    hub.refuse.add("model.pth")
    engine = XttsEngine(None, accept_licence=True)
    assert engine.availability()[0] is True  # accepted, the hub answers: a load can fetch it now
    assert engine.hub is not None
    engine.hub.download.retry_s = 600.0  # the backoff outlasts the test, however slow the machine
    with pytest.raises(EngineUnavailable, match="downloading XTTS v2"):
        engine.load()
    assert engine.hub.download.wait(timeout=HANG_GUARD_S) == "failed"
    ok, reason = engine.availability()
    assert not ok and reason and "failed" in reason and "retries in" in reason
    with pytest.raises(EngineUnavailable) as refused:
        engine.load()
    wait = re.search(r"the next load retries in (\d+) s", refused.value.detail)
    assert wait and refused.value.retry_after == int(wait.group(1)) > 30, refused.value.detail


# -- end to end: a gateway process and the CLI against the fake endpoint ------------------------------------
@pytest.mark.slow
def test_first_load_downloads_in_the_background_then_synthesizes(hub: FakeHub, hub_env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    hub.throttle_s = 0.05  # ~5 s for the 96 MB model.pth: long enough to watch the progress
    with uvicorn_server({**hub_env, "TTS_GATEWAY_ACCEPT_CPML": "1"}) as base:
        before = httpx.get(base + "/v1/engines/xtts", timeout=30).json()
        assert before["available"] is True and before["loaded"] is False
        assert "first load fetches" in before["reason"]
        assert not [r for r in hub.requests if "/resolve/" in r[1]]  # nothing downloaded before a load
        started = time.monotonic()
        problem = assert_problem(httpx.post(base + "/v1/engines/xtts/load", timeout=60), 503, "downloading XTTS v2")
        assert time.monotonic() - started < 30  # the request does not wait for the download
        seen: list[str] = []

        def downloaded(state: dict[str, Any]) -> bool:
            assert httpx.get(base + "/health", timeout=30).status_code == 200
            return bool(state["available"] and state["reason"] is None)

        # the server answers while the model downloads, with the bytes so far in the reason
        poll_engine(base, downloaded, seen, what="the download to finish")
        sizes = [r for r in seen if re.search(r"downloading XTTS v2 \(tts-hub/XTTS-v2 from http://127\.0\.0\.1:\d+\):"
                                              r" [\d.]+ (B|kB|MB) of 96\.\d MB", r)]
        assert sizes, seen
        assert problem["detail"].startswith("engine 'xtts' is unavailable: downloading XTTS v2")

        voices = {v["name"]: v for v in httpx.get(base + "/v1/voices", timeout=60).json()["voices"]}
        assert {"xtts:claribel-dervla", "xtts:ana-florence", "xtts:viktor-eka"} <= set(voices)
        response = httpx.post(base + "/v1/synthesize", json={"text": "Hello there.", "voice": "xtts:claribel-dervla",
                                                             "seed": 3}, timeout=HANG_GUARD_S)
        assert response.status_code == 200, response.text
        assert response.headers["x-engine"] == "xtts" and response.headers["x-voice"] == "xtts:claribel-dervla"
        audio, rate = decode(response.content)
        assert rate == 24000 and audio.size > 2400 and float(abs(audio).max()) > 0
        engine = httpx.get(base + "/v1/engines/xtts", timeout=30).json()
        assert engine["loaded"] and engine["model"]["id"] == f"xtts_v2/{REPO}@{COMMIT[:12]}"
    model_pth = model_snapshot(tmp_path) / "model.pth"
    assert model_pth.read_bytes() == (hub.blobs["model.pth"]).read_bytes()  # type: ignore[union-attr]
    assert not hub.fetched("dvae.pth") and not hub.fetched("en_sample.wav")  # coqui's ignore patterns held
    assert not (tmp_path / "tts-home" / "tts" / TOS).exists()  # the setting accepts; it records nothing


@pytest.mark.slow
def test_interrupted_download_is_unavailable_then_recovers(hub: FakeHub, hub_env: dict[str, str],
                                                           tmp_path: Path) -> None:
    hub.drop["model.pth"] = 10 * CHUNK  # cut mid-file; the retry that follows is refused
    with uvicorn_server({**hub_env, "TTS_GATEWAY_ACCEPT_CPML": "1"}) as base:
        assert_problem(httpx.post(base + "/v1/engines/xtts/load", timeout=60), 503, "downloading XTTS v2")
        failed = poll_engine(base, lambda s: "failed" in (s.get("reason") or ""), what="the download to fail")
        assert failed["available"] is False and failed["loaded"] is False
        assert "retries" in failed["reason"] and "models pull xtts" in failed["reason"]
        ready = httpx.get(base + "/ready", timeout=30).json()["detail"]
        assert "xtts " in ready and "downloading XTTS v2" in ready and "failed" in ready, ready
        assert not (model_snapshot(tmp_path) / "model.pth").exists()  # never a partial file in the snapshot
        assert not list((model_snapshot(tmp_path).parent.parent / "blobs").glob("*.incomplete"))
        assert_problem(httpx.post(base + "/v1/engines/xtts/load", timeout=60), 503, "failed")

        hub.heal()
        poll_engine(base, lambda s: s["available"], what="the retry to be due")
        assert_problem(httpx.post(base + "/v1/engines/xtts/load", timeout=60), 503, "downloading XTTS v2")
        poll_engine(base, lambda s: s["available"] and s["reason"] is None, what="the second download")
        response = httpx.post(base + "/v1/synthesize", json={"text": "Back again.", "voice": "xtts:viktor-eka",
                                                             "seed": 1}, timeout=HANG_GUARD_S)
        assert response.status_code == 200, response.text
    assert (model_snapshot(tmp_path) / "model.pth").read_bytes() == hub.blobs["model.pth"].read_bytes()  # type: ignore[union-attr]
    # the finished small files of the failed attempt were kept, not fetched again
    assert len(hub.fetched("config.json")) == 1 and len(hub.fetched("speakers_xtts.pth")) == 1


@pytest.mark.slow
def test_pull_records_the_licence_resumes_a_cut_and_then_works_offline(hub: FakeHub, hub_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    env = {**os.environ, **hub_env}
    cli = [sys.executable, "-m", "tts_gateway"]
    refused = subprocess.run([*cli, "models", "pull", "xtts"], env=env, capture_output=True, text=True,
                             timeout=HANG_GUARD_S)
    assert refused.returncode == 2 and "--accept-license" in refused.stderr and "Coqui Public Model License" in (
        " ".join(refused.stderr.split()))
    assert not hub.requests  # nothing fetched without the licence

    hub.drop["model.pth"] = 20 * CHUNK
    hub.drop_once = True  # one cut: huggingface_hub resumes the same file with a Range request
    pulled = subprocess.run([*cli, "models", "pull", "xtts", "--accept-license"], env=env, capture_output=True,
                            text=True, timeout=2 * HANG_GUARD_S)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().endswith(f"snapshots/{COMMIT}")
    assert (tmp_path / "tts-home" / "tts" / TOS).read_text() == xtts_models.TOS_TEXT
    assert [r for r in hub.fetched("model.pth") if r[2] == f"bytes={20 * CHUNK}-"], hub.fetched("model.pth")
    assert (model_snapshot(tmp_path) / "model.pth").read_bytes() == hub.blobs["model.pth"].read_bytes()  # type: ignore[union-attr]

    hub.close()  # from now on there is no endpoint at all
    offline = {**env, "HF_HUB_OFFLINE": "1"}  # no TTS_GATEWAY_ACCEPT_CPML: the recorded acceptance counts
    out = tmp_path / "offline.wav"
    said = subprocess.run([*cli, "say", "Hello from the cache.", "--voice", "xtts:ana-florence", "--seed", "2",
                           "--out", str(out)], env=offline, capture_output=True, text=True,
                          timeout=2 * HANG_GUARD_S)
    assert said.returncode == 0, said.stderr
    audio, rate = decode(out.read_bytes())
    assert rate == 24000 and audio.size > 2400
