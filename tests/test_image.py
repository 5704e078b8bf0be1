"""The container image, built from the Dockerfile and spoken to as a user would (`make test-image`).

The image is built with `make image` on docker (when its daemon answers) or podman. Without
IMAGE_BUILD_FLAGS in the environment the build uses scripts/container-base.sh's stand-in for
python:3.11-slim, so no container registry is needed (that needs root); with IMAGE_BUILD_FLAGS set
(even empty) those flags are used instead, e.g. none on a machine that can pull python:3.11-slim.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import HANG_GUARD_S, decode, wait_until

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("TEST_IMAGE", "localhost/tts-gateway:test")
# A bound on a hang, not a speed claim: a build from scratch downloads and installs torch and the rest.
BUILD_GUARD_S = 3600
JAPANESE = "今日はとても良い天気ですね。"


def _engine() -> str | None:
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        return "docker"
    return "podman" if shutil.which("podman") else None


ENGINE = _engine()


def _run_flags() -> list[str]:
    """podman's default ulimits can exceed the host's hard limits, and then no container starts."""
    if ENGINE != "podman":
        return []
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    procs = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    procs = 32768 if procs == resource.RLIM_INFINITY else min(procs, 32768)
    return ["--ulimit", f"nofile={files}:{files}", "--ulimit", f"nproc={procs}:{procs}"]


def _container(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert ENGINE is not None
    # podman: runc when installed, as `make image` does (crun fails on mixed cgroup v1/v2 hierarchies)
    engine = [ENGINE, "--runtime", "runc"] if ENGINE == "podman" and shutil.which("runc") else [ENGINE]
    return subprocess.run([*engine, *args], capture_output=True, text=True, check=check, timeout=HANG_GUARD_S)


@pytest.fixture(scope="module")
def image() -> str:
    if ENGINE is None:
        pytest.skip("neither docker (with its daemon) nor podman is installed")
    flags = os.environ.get("IMAGE_BUILD_FLAGS")
    if flags is None:
        flags = subprocess.run([str(ROOT / "scripts/container-base.sh")], stdout=subprocess.PIPE, text=True,
                               check=True, timeout=HANG_GUARD_S * 10).stdout.strip()
    subprocess.run(["make", "--no-print-directory", "image", f"IMAGE={IMAGE}", f"CONTAINER={ENGINE}",
                    f"IMAGE_BUILD_FLAGS={flags}"], cwd=ROOT, check=True, timeout=BUILD_GUARD_S)
    return IMAGE


class Gateway:
    """One container of the image, on a named volume; its port 8001 published on a free loopback port."""

    def __init__(self, image: str, name: str, volume: str) -> None:
        self.name = name
        _container("run", "--detach", "--name", name, *_run_flags(), "--publish", "127.0.0.1::8001",
                   "--volume", f"{volume}:/data", image)
        mapped = _container("port", name, "8001").stdout.split()[0]
        self.url = "http://" + mapped.replace("0.0.0.0", "127.0.0.1")

    def logs(self) -> str:
        result = _container("logs", self.name, check=False)
        return result.stdout + result.stderr

    def ready(self) -> bool:
        state = json.loads(_container("inspect", "--format", "{{json .State}}", self.name).stdout)
        assert state["Running"], f"the container stopped (exit {state.get('ExitCode')}):\n{self.logs()}"
        try:
            return httpx.get(self.url + "/ready", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self) -> None:
        wait_until(self.ready, f"/ready of container {self.name}", timeout=HANG_GUARD_S * 3, interval=1.0)

    def synthesize(self, **body: object) -> httpx.Response:
        return httpx.post(self.url + "/v1/synthesize", json=body, timeout=HANG_GUARD_S)


@pytest.fixture
def containers(image: str) -> Iterator[tuple[str, list[str]]]:
    """A fresh volume name and a list the test appends its container names to; all removed afterwards."""
    volume = f"tts-gateway-test-{os.getpid()}"
    names: list[str] = []
    _container("volume", "create", volume)
    try:
        yield volume, names
    finally:
        for name in names:
            _container("rm", "--force", "--time", "5", name, check=False)
        _container("volume", "rm", "--force", volume, check=False)
    for name in names:
        assert _container("container", "exists", name, check=False).returncode != 0, f"{name} was not removed"


def _speech(response: httpx.Response, rate: int) -> None:
    assert response.status_code == 200, response.text
    audio, got = decode(response.content)
    assert got == rate and audio.size > rate * 0.5, (got, audio.size)
    assert float(np.sqrt(np.mean(np.square(audio)))) > 0.01  # speech, not silence


def _assert_healthy(name: str) -> None:
    """The image's HEALTHCHECK passes: podman runs it on demand (its timer needs systemd); docker runs it itself."""
    if ENGINE == "podman":
        result = _container("healthcheck", "run", name, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return

    def healthy() -> bool:
        health = json.loads(_container("inspect", "--format", "{{json .State.Health}}", name).stdout)
        return bool(health) and health["Status"] == "healthy"

    wait_until(healthy, f"docker to call {name} healthy", timeout=HANG_GUARD_S, interval=1.0)


def test_the_image_serves_speaks_keeps_presets_in_its_volume_and_runs_as_a_user(
        image: str, containers: tuple[str, list[str]]) -> None:
    volume, names = containers
    first_name = f"{volume}-a"
    names.append(first_name)
    first = Gateway(image, first_name, volume)
    first.wait_ready()

    # the built-in default voice works offline: its model is a Python package inside the image
    spoken = first.synthesize(text="Hello from the container. The default voice speaks.")
    _speech(spoken, 22050)
    assert spoken.headers["x-voice"] == "piper:joe"

    blend = httpx.post(first.url + "/v1/voices", timeout=HANG_GUARD_S, files={
        "name": (None, "my-blend"), "engine": (None, "kokoro"), "blend": (None, "jf_alpha:3,jf_nezumi:2")})
    assert blend.status_code == 201, blend.text
    assert blend.json()["blend"] == "jf_alpha:0.6,jf_nezumi:0.4"
    _speech(first.synthesize(text=JAPANESE, voice="my-blend"), 24000)

    # the serving process (PID 1) is not root, and the image's HEALTHCHECK passes
    status = _container("exec", first_name, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids, status
    _assert_healthy(first_name)

    # stopped and replaced by a new container on the same volume: the preset is still there and speaks
    _container("stop", "--time", "30", first_name)
    second_name = f"{volume}-b"
    names.append(second_name)
    second = Gateway(image, second_name, volume)
    second.wait_ready()
    found = httpx.get(second.url + "/v1/voices/my-blend", timeout=HANG_GUARD_S)
    assert found.status_code == 200, found.text
    assert found.json()["blend"] == "jf_alpha:0.6,jf_nezumi:0.4"
    _speech(second.synthesize(text=JAPANESE, voice="my-blend"), 24000)
