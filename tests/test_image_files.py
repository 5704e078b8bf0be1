"""The image's files without building it: the Dockerfile's settings and compose.yaml, read as the gateway
and compose would read them, and the one install script `make install` and the Dockerfile share.

No compose runs here (the PostgreSQL profile needs a registry to pull postgres from): these tests check
that compose.yaml means what the README says, with every setting one the gateway knows.
tests/test_image.py builds the image and runs it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tts_gateway.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _interpolate(value: Any) -> str:
    """A compose value with ``${NAME:-default}`` replaced by its default, as with an empty shell."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _settings(service: dict[str, Any], shell: dict[str, str] | None = None) -> Settings:
    """The settings a service's container gets; a variable without a value comes from ``shell`` if set there."""
    environ = {}
    for key, value in service["environment"].items():
        if value is None:
            if shell and key in shell:
                environ[key] = shell[key]
        else:
            environ[key] = _interpolate(value)
    return Settings.from_env(environ)


def _dockerfile_env() -> dict[str, str]:
    """The final stage's ENV lines (one ENV instruction, ``KEY=VALUE`` pairs joined by backslashes)."""
    final = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1]
    joined = final.replace("\\\n", " ")
    pairs: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                pairs[key] = value
    return pairs


def test_the_image_listens_on_all_addresses_and_keeps_its_data_in_the_volume() -> None:
    env = _dockerfile_env()
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("TTS_GATEWAY_")})
    assert settings.unknown_variables == ()
    assert settings.host == "0.0.0.0" and settings.port == 8001
    volume = re.search(r"^VOLUME (\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert volume is not None
    # the registry and every cache a library keeps under HOME or its own variable live in the volume
    assert str(settings.data_dir) == volume.group(1)
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TTS_HOME"):
        assert Path(env[key]).is_relative_to(volume.group(1)), (key, env[key])


def test_compose_runs_one_gateway_by_default_on_the_image_volume() -> None:
    services = _compose()["services"]
    default = [name for name, service in services.items() if not service.get("profiles")]
    assert default == ["gateway"]
    gateway = services["gateway"]
    assert gateway["build"] == "." and gateway["ports"] == ["127.0.0.1:8001:8001"]
    assert gateway["volumes"] == ["tts-data:/data"]
    settings = _settings(gateway)
    assert settings.unknown_variables == () and settings.registry_url is None
    # with an empty shell every setting is the gateway's default; set there, it passes through
    assert settings.default_voice == "piper:joe" and settings.api_keys == ()
    shell = {"TTS_GATEWAY_API_KEYS": "k1:admin", "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en"}
    passed = _settings(gateway, shell)
    assert passed.default_voice == "espeak:en" and [key.key for key in passed.api_keys] == ["k1"]


def test_compose_postgres_profile_shares_one_registry_between_two_gateways() -> None:
    compose = _compose()
    services = compose["services"]
    profiled = {name for name, service in services.items() if "postgres" in service.get("profiles", [])}
    gateways = sorted(name for name in profiled if services[name].get("build") == ".")
    assert len(gateways) == 2 and "postgres" in profiled
    postgres = services["postgres"]
    user, database = postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"]
    password = _interpolate(postgres["environment"]["POSTGRES_PASSWORD"])
    ports, volumes = set(), set()
    for name in gateways:
        service = services[name]
        settings = _settings(service)
        assert settings.unknown_variables == ()
        # the same registry for both, on the postgres service, with its credentials
        assert settings.registry_url == f"postgresql://{user}:{password}@postgres:5432/{database}"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["image"] == services["gateway"]["image"]
        ports.update(service["ports"])
        volumes.update(service["volumes"])
    assert len(ports) == 2 and len(volumes) == 2  # reachable side by side, caches not shared
    assert postgres["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    named = {volume.split(":")[0] for service in services.values() for volume in service.get("volumes", [])}
    assert named <= set(compose["volumes"])


def test_make_install_and_the_image_install_through_the_one_script(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    dry = subprocess.run(["make", "--no-print-directory", "-n", "-B", "-C", str(ROOT), "install", f"VENV={venv}"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"scripts/install-python.sh {venv}/bin/pip cpu -e ." in dry.stdout, dry.stdout
    assert "torch==" not in dry.stdout  # the recipe is the script's alone
    assert re.search(r'/src/scripts/install-python\.sh /opt/venv/bin/pip "\$TORCH" "/src\[postgres\]"',
                     (ROOT / "Dockerfile").read_text())


def _install(tmp_path: Path, torch: str, **env: str) -> tuple[int, list[str]]:
    """Runs scripts/install-python.sh with a pip that records its arguments, one line per call."""
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    pip = tmp_path / "pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    pip.chmod(0o755)
    result = subprocess.run([str(ROOT / "scripts/install-python.sh"), str(pip), torch, "-e", "."],
                            env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)
    return result.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_the_install_script_takes_torch_first_from_the_index_torch_asks_for(tmp_path: Path) -> None:
    code, calls = _install(tmp_path, "cpu")
    assert code == 0 and len(calls) == 4, calls
    assert re.search(r"torch==2\.\d+\.\d+ --extra-index-url https://download\.pytorch\.org/whl/cpu$", calls[0])
    assert calls[1] == "install -e ."
    assert calls[2].startswith("install --no-deps pyopenjtalk-plus") and "sudachipy" in calls[2]
    assert calls[3].startswith("install --no-deps torchaudio==") and "torchcodec==" in calls[3]
    code, calls = _install(tmp_path, "cuda", TORCH_VERSION="2.12.0")
    assert code == 0 and calls[0] == "install --retries 1 torch==2.12.0", calls
    code, calls = _install(tmp_path, "rocm")
    assert code == 2 and calls == []
