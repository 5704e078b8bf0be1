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


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_make_goes_on_without_optional_system_packages_when_apt_fails(tmp_path: Path) -> None:
    """`make run`'s system-deps step, as root, with apt failing (its lock held past the wait, or a mirror
    down): it waits for the lock, then goes on without the package and says so instead of stopping."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "apt-calls"
    _stub(stubs, "id", 'echo 0')  # root, as in CI
    _stub(stubs, "dpkg", "exit 1")  # nothing installed
    _stub(stubs, "apt-get", f'echo "$@" >> {calls}; echo "E: Could not get lock /var/lib/dpkg/lock-frontend" >&2; '
                            "exit 100")
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "system-deps",
                             "APT_PACKAGES=espeak-ng", "APT_LOCK_WAIT=7"],
                            env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not install espeak-ng" in result.stdout and "going on without" in result.stdout
    invocations = calls.read_text().splitlines()
    assert any("install" in line and "espeak-ng" in line for line in invocations), invocations
    assert all("DPkg::Lock::Timeout=7" in line for line in invocations), invocations


BARE_NAMES_SCRIPT = textwrap.dedent("""
    import importlib, pathlib, pkgutil, sys
    import tts_gateway

    for module in pkgutil.walk_packages(tts_gateway.__path__, "tts_gateway."):
        if module.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(module.name)
        except ImportError as exc:  # an optional extra (ray, psycopg) that is not installed
            print("skipped", module.name, exc, file=sys.stderr)
    loaded = sorted(n for n in ("config", "engines", "voices", "gateway") if n in sys.modules)
    files = [pathlib.Path(m.__file__) for n, m in sys.modules.items()
             if n.startswith("tts_gateway") and getattr(m, "__file__", None)]
    print(loaded, [str(f) for f in files if f.resolve() != f.absolute()])
""")


def test_with_the_repository_on_sys_path_no_bare_name_is_loaded_and_no_module_comes_through_a_link() -> None:
    """The repository root first on sys.path (as pytest's rootdir or an IDE's source root puts it): importing
    every module of the package loads no bare config/engines/voices/gateway, and each module is its real file
    (tracebacks, coverage and linters name the same path)."""
    result = subprocess.run([sys.executable, "-c", BARE_NAMES_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".cache"), "PYTHONPATH": str(ROOT)},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[] []", result.stdout


# Runs as if the postgres extra were not installed: psycopg cannot be imported (None in sys.modules).
NO_PSYCOPG = 'import sys\nsys.modules["psycopg"] = sys.modules["psycopg_pool"] = None\n'
POSTGRES_EXTRA_SCRIPT = NO_PSYCOPG + textwrap.dedent("""
    import pathlib
    from tts_gateway.config import Settings, SettingsError
    from tts_gateway.gateway import create_app  # the gateway imports whole without psycopg
    from tts_gateway.voices import LocalVoiceRegistry, open_registry

    data = pathlib.Path(sys.argv[1])
    local = open_registry(Settings(data_dir=data / "local"))
    assert type(local) is LocalVoiceRegistry and local.health() is None
    local.close()
    try:
        open_registry(Settings(data_dir=data / "shared", registry_url="postgresql://db.invalid/voices"))
    except SettingsError as exc:
        print(exc.detail)
    else:
        raise AssertionError("a PostgreSQL registry opened without psycopg")
""")


def test_the_postgres_registry_is_an_extra_and_asking_for_it_without_psycopg_names_the_extra(tmp_path: Path) -> None:
    """Without psycopg the gateway imports and the local registry serves; TTS_GATEWAY_REGISTRY_URL then stops
    start-up with a SettingsError naming the extra to install, and the CLI says it in one line (exit 2)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", POSTGRES_EXTRA_SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    detail = result.stdout.strip().splitlines()[-1]
    assert "TTS_GATEWAY_REGISTRY_URL" in detail and "pip install 'tts-gateway[postgres]'" in detail, detail

    cli = subprocess.run([sys.executable, "-c", NO_PSYCOPG + "from tts_gateway.cli import app\napp()", "voices",
                          "list"], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env={**env, "TTS_GATEWAY_DATA_DIR": str(tmp_path / "cli"), "TTS_GATEWAY_ENGINES": "espeak",
                              "TTS_GATEWAY_REGISTRY_URL": "postgresql://db.invalid/voices"})
    assert cli.returncode == 2, (cli.stdout, cli.stderr[-3000:])
    assert "pip install 'tts-gateway[postgres]'" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
