"""Issue 29: what the command line and the README say is true and readable — help that names every built-in
engine and shows the preset-name pattern whole, an engines table that fits an 80-column terminal (the reasons
whole in ``--json``), a ``voices add`` whose error is the real one, not a download's in-progress line, and a
README whose opening names every engine enabled by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import HANG_GUARD_S, ROOT, free_port, voice_audio, wav
from tts_gateway.config import Settings
from tts_gateway.voices.names import VOICE_NAME_RE

# Settings and caches that would let the user's machine answer instead of the test's folders.
LEAKS = ("COQUI_TOS_AGREED", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
         "TTS_GATEWAY_ACCEPT_CPML", "TTS_GATEWAY_XTTS_CHECKPOINT", "TTS_GATEWAY_KOKORO_MODEL",
         "TTS_GATEWAY_KOKORO_VOICES", "KOKORO_JA_CACHE")


def cli(tmp_path: Path, *args: str, columns: int = 80, **env: str) -> subprocess.CompletedProcess[str]:
    """``tts-gateway ARGS`` in a terminal ``columns`` wide, with its own home, caches and data dir."""
    base = {k: v for k, v in os.environ.items() if k not in LEAKS}
    base.update({"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg"),
                 "TTS_HOME": str(tmp_path / "tts-home"), "HF_HOME": str(tmp_path / "hf"),
                 "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "COLUMNS": str(columns),
                 "PYTHONPATH": str(ROOT), **env})
    return subprocess.run([sys.executable, "-m", "tts_gateway", *args], capture_output=True, text=True, env=base,
                          timeout=HANG_GUARD_S)


def test_help_names_every_built_in_engine_and_the_whole_name_pattern(tmp_path: Path) -> None:
    top = cli(tmp_path, "--help", columns=200)
    assert top.returncode == 0, top.stderr
    for engine in ("XTTS v2", "Piper", "espeak-ng", "Kokoro"):
        assert engine in top.stdout, top.stdout
    add = cli(tmp_path, "voices", "add", "--help", columns=200)
    assert add.returncode == 0, add.stderr
    assert f"Preset name: {VOICE_NAME_RE.pattern}" in add.stdout, add.stdout  # not "^{0,63}$"


def test_the_engines_table_fits_80_columns_and_json_keeps_each_reason_whole(tmp_path: Path) -> None:
    # No licence accepted and no model: XTTS's reason is several sentences long.
    table = cli(tmp_path, "engines", TTS_GATEWAY_ENGINES="piper,xtts")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), table.stdout
    assert len(lines) <= 10, table.stdout  # a header, a rule and two rows of a few lines each
    assert "XTTS v2 is" in table.stdout and "--json" in table.stderr
    listed = cli(tmp_path, "engines", "--json", TTS_GATEWAY_ENGINES="piper,xtts")
    assert listed.returncode == 0, listed.stderr
    engines = {e["name"]: e for e in json.loads(listed.stdout)}
    assert engines["piper"]["available"] is True and engines["piper"]["reason"] is None
    assert engines["piper"]["model"]["id"] and "en" in engines["piper"]["languages"]
    reason = engines["xtts"]["reason"]
    assert engines["xtts"]["available"] is False and engines["xtts"]["cloning"] is True
    for words in ("Coqui Public Model License", "TTS_GATEWAY_ACCEPT_CPML=1", "TTS_GATEWAY_XTTS_CHECKPOINT"):
        assert words in reason, reason


def test_voices_add_reports_the_download_that_failed_not_its_progress_line(tmp_path: Path) -> None:
    """With the licence accepted, no model and a hub that cannot be reached, the command's error says so,
    never a download's in-progress line."""
    clip = tmp_path / "me.wav"
    clip.write_bytes(wav(voice_audio()))
    added = cli(tmp_path, "voices", "add", "me", str(clip), "--consent", TTS_GATEWAY_ENGINES="xtts",
                TTS_GATEWAY_ACCEPT_CPML="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10")
    assert added.returncode == 1, added.stderr
    error = next(line for line in added.stderr.splitlines() if line.startswith("error:"))
    assert "cannot be reached" in error and "HF_ENDPOINT" in error, added.stderr
    assert "listing files" not in error, added.stderr


ENGINE_WORDS = {"piper": "**Piper**", "xtts": "**XTTS v2**", "espeak": "**espeak-ng**", "kokoro": "**Kokoro**"}


def test_the_readme_opening_names_every_engine_enabled_by_default() -> None:
    readme = (ROOT / "README.md").read_text()
    opening = readme.split("\n\n")[1]  # the paragraph under the title
    for engine in Settings().engines:
        assert ENGINE_WORDS[engine] in opening, (engine, opening)
