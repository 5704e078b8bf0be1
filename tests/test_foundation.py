"""Issue 3: the runnable gateway, Piper out of the box, plugins, settings and errors."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest

from tests.conftest import ROOT, assert_problem, decode, running_app
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway import BaseEngine, BuiltinVoice, EngineContext, ModelInfo, Register
from tts_gateway.config import Settings, SettingsError
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.manager import EngineManager


def test_piper_speaks_english_out_of_the_box(client: Any) -> None:
    response = client.post("/v1/synthesize", json={"text": "Hello, my name is Joe. How are you today?"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["x-engine"] == "piper"
    assert response.headers["x-voice"] == "piper:joe"
    assert response.headers["x-seed"].isdigit()
    audio, rate = decode(response.content)
    assert rate == 22050
    assert audio.ndim == 1
    assert audio.size / rate > 0.5
    assert float(np.sqrt(np.mean(audio**2))) > 0.01  # not silent


def test_seeded_piper_is_repeatable(client: Any) -> None:
    body = {"text": "Repeat after me.", "seed": 42}
    first = client.post("/v1/synthesize", json=body)
    second = client.post("/v1/synthesize", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-seed"] == "42"
    assert first.content == second.content


def test_engines_listing(client: Any) -> None:
    engines = {e["name"]: e for e in client.get("/v1/engines").json()["engines"]}
    piper = engines["piper"]
    assert piper["available"] is True
    assert piper["languages"] == ["en"]
    assert piper["sample_rate"] == 22050
    assert piper["capabilities"] == {"cloning": False, "streaming": True, "timestamps": ["word", "sentence"]}
    assert piper["model"]["licence"] == "CC0-1.0"
    assert len(piper["model"]["sha256"]) == 64
    assert "piper:joe" in piper["voices"]


def test_health_docs_and_openapi(client: Any) -> None:
    assert client.get("/health").json()["status"] == "ok"
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/docs/openapi.json").json()
    assert "/v1/synthesize" in schema["paths"]


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        ({"text": ""}, 422, "empty"),
        ({"text": "   \n\t "}, 422, "empty"),
        ({"text": 5}, 422, "str"),
        ({"text": "hi", "unknown": 1}, 422, "unknown"),
        ({"text": "hi", "voice": "nobody"}, 404, "unknown voice"),
        ({"text": "hi", "voice": "piper:nobody"}, 404, "unknown voice"),
        ({"text": "hi", "voice": "nope:joe"}, 404, "no engine"),
        ({"text": "hi", "format": "aiff"}, 422, "format"),
        ({"voice": "piper:joe"}, 422, "text"),
        ([1, 2], 422, ""),
    ],
)
def test_bad_requests_are_problems(client: Any, body: Any, status: int, word: str) -> None:
    assert_problem(client.post("/v1/synthesize", json=body), status, word)


def test_malformed_json_and_wrong_content_type(client: Any) -> None:
    assert_problem(client.post("/v1/synthesize", content=b'{"text": ', headers={"content-type": "application/json"}),
                   400, "malformed")
    assert_problem(client.post("/v1/synthesize", content=b"text=hi", headers={"content-type": "text/plain"}), 415)


def test_unknown_route_is_a_problem(client: Any) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)


def test_synthesis_runs_in_a_worker_thread(fake_client: Any, fake_engine: FakeEngine) -> None:
    response = fake_client.post("/v1/synthesize", json={"text": "hello"})
    assert response.status_code == 200
    assert fake_engine.threads and all(name.startswith("tts-worker") for name in fake_engine.threads)


def test_engines_load_lazily_and_once(make_settings: Any) -> None:
    engine = FakeEngine()
    engine.load_delay = 0.3
    manager = EngineManager(make_settings(engines=()), extra_plugins=(FakePlugin(engine),), load_entry_points=False)
    assert not engine.loaded
    threads = [threading.Thread(target=manager.ensure_loaded, args=("fake",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.loads == 1
    assert engine.loaded


def test_misspelt_hook_fails_loudly(make_settings: Any) -> None:
    class Misspelt:
        @hookimpl
        def register_engine(self, register: Any) -> None:  # should be register_engines
            raise AssertionError("never called")

    with pytest.raises(pluggy.PluginValidationError, match="register_engine"):
        EngineManager(make_settings(engines=()), extra_plugins=(Misspelt(),), load_entry_points=False)


def test_duplicate_engine_names_fail(make_settings: Any) -> None:
    with pytest.raises(ValueError, match="two plugins"):
        EngineManager(make_settings(engines=()), extra_plugins=(FakePlugin(FakeEngine()), FakePlugin(FakeEngine())),
                      load_entry_points=False)


def test_registration_names_what_an_engine_lacks(make_settings: Any) -> None:
    class Forgetful(BaseEngine):  # no sample_rate, no synthesize
        name = "hello"
        languages = ("en",)

    class Nameless:
        pass

    for engine, message in [(Forgetful(), "engine 'hello' lacks sample_rate, synthesize"),
                            (Nameless(), "engine 'Nameless' lacks name, capabilities, sample_rate, languages")]:
        class Plugin:
            @hookimpl
            def register_engines(self, register: Register) -> None:
                register(engine)  # noqa: B023  # called before the loop moves on

        with pytest.raises(TypeError, match=message):
            EngineManager(make_settings(engines=()), extra_plugins=(Plugin(),), load_entry_points=False)


def test_a_plugin_engine_gets_its_own_options_from_the_environment(tmp_path: Path) -> None:
    received: list[dict[str, str]] = []

    class Greeter(BaseEngine):
        name, sample_rate, languages = "hello", 16000, ("en",)

        def __init__(self, options: dict[str, str]) -> None:
            super().__init__()
            self.options = options

        @property
        def model(self) -> ModelInfo:
            return ModelInfo(id=f"greeter/{self.options.get('greeting')}")

        def voices(self) -> list[BuiltinVoice]:
            return [BuiltinVoice("one", "en")]

        def synthesize(self, text: str, voice: Any, options: Any) -> Any:
            yield np.zeros(160, np.float32)

    class Plugin:
        @hookimpl
        def register_engines(self, register: Register, context: EngineContext) -> None:
            received.append(context.options_for("hello"))
            register(Greeter(context.options_for("hello")))

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path), "TTS_GATEWAY_ENGINES": "", "TTS_GATEWAY_DEFAULT_VOICE": "hello:one",
           "TTS_GATEWAY_CANARY": "0", "TTS_GATEWAY_ENGINE_HELLO_GREETING": "hi",
           "TTS_GATEWAY_ENGINE_HELLO_REPLY_TO": "World", "TTS_GATEWAY_ENGINE_HELO_GREETING": "typo",
           "TTS_GATEWAY_ENGINE_THREADS": "1", "TTS_GATEWAY_ENGINE_THREDS": "2"}
    settings = Settings.from_env(env)
    assert settings.engine_threads == 1  # a setting of the gateway's own, not an engine option
    # Engine options are settings: only the misspelt ENGINE_THREADS is unknown.
    assert settings.unknown_variables == (("TTS_GATEWAY_ENGINE_THREDS", "TTS_GATEWAY_ENGINE_THREADS"),)
    with running_app(settings, Plugin()) as client:
        assert received == [{"greeting": "hi", "reply_to": "World"}]
        assert client.get("/v1/engines/hello").json()["model"]["id"] == "greeter/hi"
        summary = "\n".join(client.app.state.tts.summary())
    assert "TTS_GATEWAY_ENGINE_HELO_GREETING names no engine and is ignored (engines: hello)" in summary
    assert "HELLO_GREETING" not in summary and "REPLY_TO" not in summary


def test_settings_from_env_defaults_and_errors() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port, settings.default_voice) == ("127.0.0.1", 8001, "piper:joe")
    assert settings.engines == ("piper", "xtts", "espeak", "kokoro")
    assert settings.max_upload_bytes == 20_000_000
    parsed = Settings.from_env({"TTS_GATEWAY_API_KEYS": "a:admin,b:synthesize+voices",
                                "TTS_GATEWAY_MAX_UPLOAD_BYTES": "1MiB", "TTS_GATEWAY_PLUGINS": "x.y, z"})
    assert parsed.api_keys[0].scopes == {"admin", "synthesize", "voices"}
    assert parsed.api_keys[1].scopes == {"synthesize", "voices"}
    assert "b" not in repr(parsed.api_keys[1])
    assert parsed.max_upload_bytes == 1024 * 1024
    assert parsed.plugins == ("x.y", "z")
    for variable, value in [("PORT", "eighty"), ("PORT", "70000"), ("DEVICE", "tpu"), ("API_KEYS", "k:root"),
                            ("MAX_UPLOAD_BYTES", "lots"), ("TIMEOUT_S", "-1"), ("DEFAULT_VOICE", "../x")]:
        with pytest.raises(SettingsError, match=f"TTS_GATEWAY_{variable}"):
            Settings.from_env({f"TTS_GATEWAY_{variable}": value})


def test_bad_setting_stops_start_up_with_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "tts_gateway", "serve"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "TTS_GATEWAY_PORT": "eighty", "HOME": "/tmp"}, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "TTS_GATEWAY_PORT" in lines[0]


def test_hello_engine_via_plugins_setting(make_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "hello_engine"))
    settings = make_settings(engines=(), plugins=("hello_engine",), default_voice="hello:tone")
    with running_app(settings) as client:
        response = client.post("/v1/synthesize", json={"text": "hi there"})
        assert response.status_code == 200, response.text
        assert response.headers["x-engine"] == "hello"
        audio, rate = decode(response.content)
        assert rate == 16000
        assert audio.size == int(16000 * 0.08) * len("hi there")


def test_hello_engine_via_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "hello_engine")], check=True, timeout=300)
    script = (
        "from tts_gateway.config import Settings\n"
        "from tts_gateway.engines.manager import EngineManager\n"
        "m = EngineManager(Settings(engines=()))\n"
        "print(','.join(m.names))\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            check=True, cwd=tmp_path)
    assert result.stdout.strip() == "hello"
