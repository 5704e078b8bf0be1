"""The distribution installs one import name, `tts_gateway`; nothing it ships can shadow a user's modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a user's project directory: its own `config.py` (or the PyPI package `config`) is what
# `import config` finds, and the gateway still starts and speaks.
PROJECT_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import config  # the user's module (or PyPI's), never ours
    from litestar.testing import TestClient
    from tts_gateway.config import Settings
    from tts_gateway.gateway import create_app

    for bare in ("engines", "voices", "gateway"):
        assert importlib.util.find_spec(bare) is None, bare
    settings = Settings(data_dir=__import__("pathlib").Path(sys.argv[1]), engines=("espeak",),
                        default_voice="espeak:en", canary=False)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/synthesize", json={"text": "Still speaking."})
        assert response.status_code == 200, response.text
        assert response.content[:4] == b"RIFF"
    print(config.__file__)
""")


def _run(cwd: Path, data: Path) -> str:
    # A clean sys.path: the repository root (where the bare folders live) is not on it.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    result = subprocess.run([sys.executable, "-c", PROJECT_SCRIPT, str(data)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_a_projects_own_config_module_and_the_gateway_coexist(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.py").write_text("DATABASE = 'sqlite://'\n")
    assert _run(project, tmp_path / "data") == str(project / "config.py")


def test_the_pypi_config_package_and_the_gateway_coexist(tmp_path: Path) -> None:
    """`config` from PyPI (a dev dependency, installed in this venv) is what `import config` gets."""
    found = _run(tmp_path, tmp_path / "data")
    assert "site-packages" in found and not found.startswith(str(ROOT / "config"))


def test_the_wheel_ships_only_the_tts_gateway_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    import zipfile

    (wheel,) = tmp_path.glob("tts_gateway-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"tts_gateway"}
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("tts_gateway/engines/base.py", "tts_gateway/voices/registry.py", "tts_gateway/config/settings.py",
                   "tts_gateway/gateway/app.py", "tts_gateway/gateway/static/index.html"):
        assert module in names, module
