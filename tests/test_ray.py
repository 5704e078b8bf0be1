"""The Ray Serve backend against a real local Ray cluster (2 CPUs, 2 Piper replicas, 1 slow clone replica).

One cluster for the whole module (starting one takes ~20 s); never run these tests in parallel.
Serve's local testing mode rejects ``@serve.multiplexed``, hence a real cluster.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import HANG_GUARD_S
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
