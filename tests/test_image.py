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

from tests.conftest import HANG_GUARD_S, decode, free_port, wait_until

pytestmark = pytest.mark.image
pytest_plugins = ["tests.pg_fixtures"]

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
    """One container of the image on a volume. By default its port 8001 is published on a free loopback
    port, as a user would; ``host_port`` runs it on the host's network instead (to reach a server there)."""

    def __init__(self, image: str, name: str, volume: str, host_port: int | None = None, **env: str) -> None:
        self.name = name
        settings = [f"--env={key}={value}" for key, value in env.items()]
        if host_port is None:
            network = ["--publish", "127.0.0.1::8001"]
        else:
            network = ["--network", "host", "--env=TTS_GATEWAY_HOST=127.0.0.1", f"--env=TTS_GATEWAY_PORT={host_port}"]
        _container("run", "--detach", "--name", name, *_run_flags(), *network, *settings,
                   "--volume", f"{volume}:/data", image)
        self.host_port = host_port
        self._find_url()

    def _find_url(self) -> None:
        if self.host_port is None:  # a published port is chosen again at every start
            mapped = _container("port", self.name, "8001").stdout.split()[0]
            self.url = "http://" + mapped.replace("0.0.0.0", "127.0.0.1")
        else:
            self.url = f"http://127.0.0.1:{self.host_port}"

    def restart(self) -> None:
        """Stop the container as `docker stop` does (SIGTERM, then a grace period) and start it again."""
        _container("stop", "--time", "30", self.name)
        _container("start", self.name)
        self._find_url()

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

    def blend(self, name: str, recipe: str) -> httpx.Response:
        """POST /v1/voices: a Kokoro preset mixed from built-in voices (no audio)."""
        return httpx.post(self.url + "/v1/voices", timeout=HANG_GUARD_S, files={
            "name": (None, name), "engine": (None, "kokoro"), "blend": (None, recipe)})


class Containers:
    """The test's volumes and containers, named after this process; all removed afterwards."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.prefix = f"tts-gateway-test-{os.getpid()}"
        self.volumes: list[str] = []
        self.names: list[str] = []

    def volume(self) -> str:
        name = f"{self.prefix}-v{len(self.volumes) + 1}"
        _container("volume", "create", name)
        self.volumes.append(name)
        return name

    def start(self, volume: str, host_port: int | None = None, **env: str) -> Gateway:
        name = f"{self.prefix}-c{len(self.names) + 1}"
        self.names.append(name)
        return Gateway(self.image, name, volume, host_port, **env)

    def remove(self) -> None:
        for name in self.names:
            _container("rm", "--force", "--time", "5", name, check=False)
        for volume in self.volumes:
            _container("volume", "rm", "--force", volume, check=False)


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    made = Containers(image)
    try:
        yield made
    finally:
        made.remove()
    for name in made.names:
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


def test_the_image_serves_speaks_keeps_presets_in_its_volume_and_runs_as_a_user(containers: Containers) -> None:
    volume = containers.volume()
    first = containers.start(volume)
    first.wait_ready()

    # the built-in default voice works offline: its model is a Python package inside the image
    spoken = first.synthesize(text="Hello from the container. The default voice speaks.")
    _speech(spoken, 22050)
    assert spoken.headers["x-voice"] == "piper:joe"

    blend = first.blend("my-blend", "jf_alpha:3,jf_nezumi:2")
    assert blend.status_code == 201, blend.text
    assert blend.json()["blend"] == "jf_alpha:0.6,jf_nezumi:0.4"
    _speech(first.synthesize(text=JAPANESE, voice="my-blend"), 24000)

    # the serving process (PID 1) is not root, and the image's HEALTHCHECK passes
    status = _container("exec", first.name, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids, status
    _assert_healthy(first.name)

    # stopped and started again: the preset is still there and speaks
    first.restart()
    first.wait_ready()
    found = httpx.get(first.url + "/v1/voices/my-blend", timeout=HANG_GUARD_S)
    assert found.status_code == 200, found.text
    _speech(first.synthesize(text=JAPANESE, voice="my-blend"), 24000)

    # stopped and replaced by a new container on the same volume: the preset lives in the volume
    _container("stop", "--time", "30", first.name)
    second = containers.start(volume)
    second.wait_ready()
    found = httpx.get(second.url + "/v1/voices/my-blend", timeout=HANG_GUARD_S)
    assert found.status_code == 200, found.text
    assert found.json()["blend"] == "jf_alpha:0.6,jf_nezumi:0.4"
    _speech(second.synthesize(text=JAPANESE, voice="my-blend"), 24000)


def test_two_containers_share_presets_through_the_postgresql_registry(containers: Containers, pg_url: str) -> None:
    """compose.yaml's postgres profile: the same image twice, TTS_GATEWAY_REGISTRY_URL, a volume each."""
    a, b = (containers.start(containers.volume(), host_port=free_port(), TTS_GATEWAY_REGISTRY_URL=pg_url)
            for _ in range(2))
    a.wait_ready()
    b.wait_ready()
    assert b.blend("shared", "jf_alpha:1,jf_nezumi:1").status_code == 201
    found = httpx.get(a.url + "/v1/voices/shared", timeout=HANG_GUARD_S)
    assert found.status_code == 200, found.text
    assert found.json()["blend"] == "jf_alpha:0.5,jf_nezumi:0.5"
    _speech(a.synthesize(text=JAPANESE, voice="shared"), 24000)
