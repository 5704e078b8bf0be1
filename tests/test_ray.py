"""The Ray Serve backend against a real local Ray cluster (2 CPUs, 2 Piper replicas, 1 slow clone replica).

One cluster for the whole module (starting one takes ~20 s); never run these tests in parallel.
Serve's local testing mode rejects ``@serve.multiplexed``, hence a real cluster.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import HANG_GUARD_S, GatewayProcess
from tts_gateway.config import Settings
from tts_gateway.core.compose import build_core
from tts_gateway.core.service import SynthesisRequest
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import Unavailable

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")

from tts_gateway.ray.serve import RayBackend, SynthesisJob

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent
SLOW_WORD_S = 0.05  # the clone replica's FAKE_CHUNK_DELAY: one 0.2 s chunk per word


@dataclass
class RayEnv:
    settings: Settings
    service: Any  # the local SynthesisService, for comparison
    backend: RayBackend
    preset: str


def _reference_wav() -> bytes:
    rate = 16000
    t = np.arange(rate * 3) / rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


# -- `tts-gateway serve` in ray mode: ready, or a one-line error; never a wait without end -----------------
# First in the module: each starts its own 2-CPU local cluster, before the module's cluster exists.
def _ray_serve_env(tmp_path: Path, tiny_xtts: Path, **extra: str) -> dict[str, str]:
    """The reported set-up: the default engines (xtts with a checkpoint), a 2-CPU cluster, ray mode."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("TTS_GATEWAY_") and key not in ("RAY_ADDRESS", "KOKORO_JA_CACHE")}
    return {**env, "PYTHONPATH": str(ROOT), "TTS_GATEWAY_BACKEND": "ray", "TTS_GATEWAY_RAY_NUM_CPUS": "2",
            "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_XTTS_CHECKPOINT": str(tiny_xtts),
            **extra}


def test_serve_in_ray_mode_with_the_default_engines_gets_ready_on_two_cpus(tmp_path: Path, tiny_xtts: Path) -> None:
    import httpx

    server = GatewayProcess(_ray_serve_env(tmp_path, tiny_xtts), inherit=False)
    try:
        server.wait_up("/ready", timeout=3 * HANG_GUARD_S)
        response = httpx.post(server.base + "/v1/synthesize", json={"text": "Four engines on two CPUs.", "seed": 1},
                              timeout=HANG_GUARD_S)
        assert response.status_code == 200 and response.headers["x-engine"] == "piper", response.text
        log = server.output()
        for engine in ("piper", "xtts", "espeak", "kokoro"):
            assert f"deployed tts-{engine} (0.5 CPU a replica)" in log, log[-3000:]
    finally:
        server.stop()


def test_serve_in_ray_mode_that_cannot_fit_says_so_in_one_line(tmp_path: Path, tiny_xtts: Path) -> None:
    env = _ray_serve_env(tmp_path, tiny_xtts, TTS_GATEWAY_RAY_REPLICA_CPUS="1")
    result = subprocess.run([sys.executable, "-m", "tts_gateway", "serve"], env=env, capture_output=True, text=True,
                            timeout=2 * HANG_GUARD_S)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "cannot place the deployments" in errors[0] and "need 4 CPUs" in errors[0]
    assert "2 free of 2" in errors[0], errors


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayEnv]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("ray-data"), engines=("piper",),
                        plugins=("tests.fake_cloning_plugin",), engine_threads=1, max_concurrency=2,
                        timeout_s=60, canary=False, default_voice="piper:joe")
    gates = tmp_path_factory.mktemp("ray-gates")  # FAKE_GATE_DIR: see tests/fake_cloning_plugin.py
    core = build_core(settings, phrase_cache=False)
    core.voices.register("ray-clone", [("ref.wav", _reference_wav())], engine_name="clone", consent=True)
    service, registry = core.service, core.registry
    backend = RayBackend(
        settings, registry, engines=["piper", "clone"], num_cpus=2, replicas=2, replica_cpus=0.5,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # replicas import tests.fake_cloning_plugin
        overrides={"clone": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                             "env": {"FAKE_CHUNK_DELAY": str(SLOW_WORD_S), "FAKE_GATE_DIR": str(gates)}}},
    )
    backend.start()
    try:
        yield RayEnv(settings, service, backend, "ray-clone")
    finally:
        backend.close()
        core.close()


def local_bytes(env: RayEnv, plan: Any) -> bytes:
    return b"".join(env.service.run(plan, threading.Event()))


def test_same_request_and_seed_give_the_same_bytes(ray_env: RayEnv) -> None:
    for fmt in ("wav", "flac"):
        request = SynthesisRequest(text="Scale out with Ray. Same seed, same bytes.", voice="piper:joe", seed=7,
                                   format=fmt)
        plan = ray_env.service.plan(request)
        remote = asyncio.run(ray_env.backend.call(plan))
        assert len(remote) > 1000
        assert remote == local_bytes(ray_env, plan), fmt


def test_job_is_plain_values(ray_env: RayEnv) -> None:
    plan = ray_env.service.plan(SynthesisRequest(text="Hello.", voice="piper:joe", seed=1))
    job = ray_env.backend.job(plan)
    raw = job.to_dict()
    assert raw["builtin"] == "joe" and raw["latents_blob"] is None and raw["pieces"] == ["Hello."]
    assert SynthesisJob.from_dict(raw) == job

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float | bool | bytes)

    assert plain(raw)


def test_streaming_yields_several_chunks_matching_local(ray_env: RayEnv) -> None:
    text = "First sentence here. A second one follows. And a third to finish."
    plan = ray_env.service.plan(SynthesisRequest(text=text, voice="piper:joe", seed=3, format="pcm", stream=True))
    assert plan.streams

    async def collect() -> list[bytes]:
        return [chunk async for chunk in ray_env.backend.stream(plan)]

    chunks = asyncio.run(collect())
    assert len(chunks) >= 3
    assert b"".join(chunks) == local_bytes(ray_env, plan)


def test_preset_runs_on_a_replica_by_latents_sha(ray_env: RayEnv) -> None:
    plan = ray_env.service.plan(SynthesisRequest(text="cloned voice", voice=ray_env.preset, seed=5))
    record = ray_env.service.voices.registry.get(ray_env.preset)
    job = ray_env.backend.job(plan)
    assert job.builtin is None and job.latents_blob is None
    assert (job.latents_key, job.latents_sha256) == (record.latents_key, record.latents_sha256)
    assert job.multiplexed_id == record.latents_sha256

    remote = asyncio.run(ray_env.backend.call(plan))
    assert remote == local_bytes(ray_env, plan)
    stats = asyncio.run(ray_env.backend.replica_stats("clone", calls=1))
    assert stats[0]["voices"] == [record.latents_sha256]
    assert stats[0]["voice_loads"] == 1
    asyncio.run(ray_env.backend.call(plan))  # the multiplexed cache serves it again
    assert asyncio.run(ray_env.backend.replica_stats("clone", calls=1))[0]["voice_loads"] == 1


def test_two_piper_replicas_serve(ray_env: RayEnv) -> None:
    stats = asyncio.run(ray_env.backend.replica_stats("piper", calls=16))
    assert len(stats) == 2
    assert all(s["loaded"] and s["rss"] > 50_000_000 for s in stats)


async def _until_queued(backend: Any, engine: str, count: int) -> None:
    """Wait until the handle's router holds ``count`` requests in its queue (Serve's own counter)."""
    router = backend._handles[engine]._router._asyncio_router  # Serve 2.60: the queue bound is enforced here
    deadline = time.monotonic() + HANG_GUARD_S
    while router._metrics_manager.num_queued_requests < count:
        assert time.monotonic() < deadline, "the request never reached Serve's queue"
        await asyncio.sleep(0.01)


def test_backpressure_is_503_and_disconnect_cancels(ray_env: RayEnv) -> None:
    # 20 pieces of 4 words; the second holds at a gate that never opens, so the stream keeps the only slot
    # until the client leaves, however slow the machine (it used to be ~4 s of chunks racing the test).
    sentences = "Say one two three. wait-for-never one two three. " + "Say one two three. " * 18
    slow = ray_env.service.plan(SynthesisRequest(text=sentences, voice=ray_env.preset, format="pcm", stream=True,
                                                 seed=1))
    assert len(slow.pieces) == 20
    quick = ray_env.service.plan(SynthesisRequest(text="hi", voice=ray_env.preset, seed=1))

    async def scenario() -> Unavailable:
        before = (await ray_env.backend.replica_stats("clone", calls=1))[0]
        first, rest = await ray_env.backend.open_stream(slow)
        assert first
        # max_ongoing_requests=1 (the stream), max_queued_requests=1 (Serve 2.60's smallest bound; 0 is refused)
        queued = asyncio.create_task(ray_env.backend.call(quick))
        await _until_queued(ray_env.backend, "clone", 1)  # the one queue place is taken, however slow the machine
        assert not queued.done()
        with pytest.raises(Unavailable) as rejected:
            await ray_env.backend.call(quick)
        await rest.aclose()  # the client goes away mid-stream
        assert len(await queued) > 44  # the queued request runs once the slot is free
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            try:
                after = (await ray_env.backend.replica_stats("clone", calls=1))[0]
            except Exception:  # still busy: the cancelled stream has not released its slot yet
                after = None
            if after is not None and after["running"] == 0:
                break
            assert time.monotonic() < deadline, "the replica kept synthesizing after the disconnect"
            await asyncio.sleep(0.05)
        assert after["cancelled"] == before["cancelled"] + 1, after  # cut short: it could never have ended
        return rejected.value

    error = asyncio.run(scenario())
    assert isinstance(error, Unavailable) and "busy" in error.detail
    assert error.retry_after is not None and error.retry_after >= 1
    # the slot is free again: a rejected request left nothing behind
    assert len(asyncio.run(ray_env.backend.call(quick))) > 44


def test_through_the_app(ray_env: RayEnv) -> None:
    """End to end: Litestar in front, the plan executed on the cluster."""
    from litestar.testing import TestClient

    from tts_gateway.gateway import create_app

    settings = ray_env.settings.with_(data_dir=ray_env.settings.data_dir)  # same registry, same presets
    app = create_app(settings, EngineManager(settings))
    # What TTS_GATEWAY_BACKEND=ray does, on the shared cluster:
    app.state.tts.runner = ray_env.backend
    body = {"text": "Through the front door.", "voice": "piper:joe", "seed": 11, "cache": False}
    with TestClient(app, timeout=120) as client:
        response = client.post("/v1/synthesize", json=body)
        assert response.status_code == 200, response.text
        plan = ray_env.service.plan(SynthesisRequest(text=body["text"], voice="piper:joe", seed=11))
        assert response.content == local_bytes(ray_env, plan)
        streamed = client.post("/v1/synthesize", json={**body, "stream": True, "format": "pcm"})
        assert streamed.status_code == 200 and len(streamed.content) > 1000
        preset = client.post("/v1/synthesize", json={"text": "preset voice", "voice": ray_env.preset, "seed": 2})
        assert preset.status_code == 200 and preset.headers["x-voice-sha256"]


# -- start-up that fits the cluster or says why it cannot ---------------------------------------------------
def test_replica_cpus_are_shared_out_or_the_shortfall_is_named() -> None:
    from tts_gateway.ray.serve import plan_replica_cpus

    # Three engines on two free CPUs (the case that used to wait forever for a third CPU): two thirds each.
    assert plan_replica_cpus({"piper": 1, "xtts": 1, "espeak": 1}, {}, 2.0, 2.0) == \
        {"piper": 0.66, "xtts": 0.66, "espeak": 0.66}
    assert plan_replica_cpus({"piper": 1, "espeak": 1}, {}, 8.0, 8.0) == {"piper": 1.0, "espeak": 1.0}  # at most 1
    assert plan_replica_cpus({"piper": 2, "xtts": 1}, {"xtts": 1.0}, 2.0, 2.0) == {"piper": 0.5, "xtts": 1.0}
    with pytest.raises(Unavailable) as short:
        plan_replica_cpus({"piper": 1, "xtts": 1, "espeak": 1}, {"piper": 1.0, "xtts": 1.0, "espeak": 1.0}, 2.0, 2.0)
    detail = short.value.detail
    assert "tts-piper 1×1, tts-xtts 1×1, tts-espeak 1×1 CPU need 3 CPUs" in detail and "2 free of 2" in detail
    assert "TTS_GATEWAY_RAY_REPLICA_CPUS" in detail and "\n" not in detail
    with pytest.raises(Unavailable, match="0 free of 2"):  # nothing left to share
        plan_replica_cpus({"espeak": 1}, {}, 0.0, 2.0)


def _deployed(name: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    (deployment,) = details["applications"][name]["deployments"].values()
    return dict(deployment["deployment_config"])


def test_a_deployment_that_does_not_fit_fails_start_up_at_once(ray_env: RayEnv) -> None:
    """The module's cluster has 2 CPUs and its replicas hold 1.5: a 1-CPU replica cannot be placed."""
    backend = RayBackend(ray_env.settings, engines=["espeak"], replica_cpus=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable) as short:
        backend.start()
    assert time.monotonic() - started < HANG_GUARD_S
    assert "tts-espeak 1×1 CPU need 1 CPUs" in short.value.detail and "0.5 free of 2" in short.value.detail
    from ray import serve

    assert "tts-espeak" not in serve.status().applications  # nothing was deployed


def test_placement_and_autoscaling_settings_reach_serve(ray_env: RayEnv) -> None:
    from ray import serve

    settings = ray_env.settings.with_(engines=("piper", "espeak"), ray_placement={"espeak": {"num_cpus": 0.25}},
                                      ray_min_replicas=1,
                                      ray_max_replicas=2, ray_target_ongoing_requests=3.0, ray_replica_cpus=0.0)
    backend = RayBackend(settings, engines=["espeak"], warm=False)
    try:
        backend.start()
        config = _deployed("tts-espeak")
        assert config["ray_actor_options"]["num_cpus"] == 0.25
        scaling = config["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 3.0)
        core = build_core(settings, phrase_cache=False)  # plans for espeak (the module's core has no espeak)
        try:
            plan = core.service.plan(SynthesisRequest(text="Placed.", voice="espeak:en", seed=1))
            assert len(asyncio.run(backend.call(plan))) > 44
        finally:
            core.close()
    finally:
        serve.delete("tts-espeak")
    # Auto: the free half CPU is shared out (at most 1 a replica), read back from Serve.
    auto = RayBackend(settings.with_(ray_placement={}, ray_max_replicas=0), engines=["espeak"], warm=False)
    try:
        auto.start()
        assert _deployed("tts-espeak")["ray_actor_options"]["num_cpus"] == 0.5
    finally:
        serve.delete("tts-espeak")


def test_a_deployment_that_never_starts_is_a_bounded_error(ray_env: RayEnv) -> None:
    """A replica waiting for a resource no node has: start-up gives up at the deadline and cleans up."""
    from ray import serve

    settings = ray_env.settings.with_(ray_start_timeout_s=3.0)
    backend = RayBackend(settings, engines=["espeak"], warm=False, overrides={"espeak": {"resources": {"tpu-v9": 1}}})
    with pytest.raises(Unavailable) as never:
        backend.start()
    assert "did not start tts-espeak within 3 s (TTS_GATEWAY_RAY_START_TIMEOUT_S)" in never.value.detail
    deadline = time.monotonic() + HANG_GUARD_S
    while "tts-espeak" in serve.status().applications:  # deleted: it holds nothing
        assert time.monotonic() < deadline
        time.sleep(0.2)
