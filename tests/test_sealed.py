"""The suite is sealed from the user's home: what a user's machine holds never changes a result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tts_gateway.engines.xtts_models import coqui_model


def test_a_test_runs_in_a_home_of_its_own(sealed_home: Path) -> None:
    assert Path.home() == sealed_home
    for variable in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TTS_HOME", "HF_HOME"):
        assert Path(os.environ[variable]).is_relative_to(sealed_home), variable
    assert not [v for v in os.environ if v.startswith("TTS_GATEWAY_")]
    assert "COQUI_TOS_AGREED" not in os.environ
    # coqui's licence mark would be looked for inside this test's home, not the user's.
    assert coqui_model().tos_file.is_relative_to(sealed_home)


def test_the_suite_passes_for_a_user_who_accepted_the_licence_and_has_settings_and_caches(tmp_path: Path) -> None:
    """A user's home with an accepted XTTS licence, a damaged registry in the default data dir, TTS_GATEWAY_*
    settings and coqui/Hugging Face variables in the shell, and a `config.py` in the current directory."""
    home = tmp_path / "home"
    tos = home / ".local/share/tts" / coqui_model().name.replace("/", "--") / "tos_agreed.txt"
    tos.parent.mkdir(parents=True)
    tos.write_text("I have read, understood and agreed to the Terms and Conditions.")
    index = home / ".local/share/tts-gateway/voices/index/cache.db"
    index.parent.mkdir(parents=True)
    index.write_bytes(b"not a database")
    (home / ".cache/huggingface/hub").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "config.py").write_text("raise SystemExit('the user\\'s config.py was imported')\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "COQUI_TOS_AGREED": "1", "HF_HUB_OFFLINE": "1",
           "TTS_GATEWAY_ENGINES": "xtts", "TTS_GATEWAY_DEFAULT_VOICE": "xtts:nobody",
           "TTS_GATEWAY_ACCEPT_CPML": "1", "TTS_GATEWAY_MAX_TEXT_CHARS": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         "-c", str(ROOT / "pyproject.toml"),
         f"{ROOT}/tests/test_voices.py::test_xtts_unavailable_without_checkpoint_says_why",
         f"{ROOT}/tests/test_http_api.py::test_openai_sdk_lists_models_and_reads_instructions_note",
         f"{ROOT}/tests/test_sealed.py::test_a_test_runs_in_a_home_of_its_own"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]
    assert tos.is_file() and index.read_bytes() == b"not a database"  # the user's files are left alone
