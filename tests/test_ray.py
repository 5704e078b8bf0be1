"""The Ray Serve backend against a real local Ray cluster (2 CPUs, 2 Piper replicas, 1 slow clone replica).

One cluster for the whole module (starting one takes ~20 s); never run these tests in parallel.
Serve's local testing mode rejects ``@serve.multiplexed``, hence a real cluster.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HANG_GUARD_S, GatewayProcess, decode, register, voice_audio, wait_until, wav
from tts_gateway.config import Settings
from tts_gateway.core.compose import build_core
from tts_gateway.core.service import SynthesisRequest
from tts_gateway.errors import Unavailable

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[ray]')")

from tts_gateway.ray.backend import RayBackend
from tts_gateway.ray.wire import SynthesisJob

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
pytest_plugins = ["tests.pg_fixtures"]  # the postgres fixture
ROOT = Path(__file__).resolve().parent.parent
SLOW_WORD_S = 0.05  # the clone replica's FAKE_CHUNK_DELAY: one 0.2 s chunk per word


@dataclass
class RayEnv:
    settings: Settings
    service: Any  # the local SynthesisService, for comparison
    backend: RayBackend
    preset: str


async def wait_until_async(condition: Callable[[], Awaitable[bool]], what: str, interval: float = 0.01) -> None:
    """``wait_until`` for a condition that must be awaited: polls without blocking the event loop."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {HANG_GUARD_S:g} s waiting for {what}")
        await asyncio.sleep(interval)


# -- `tts-gateway serve` in ray mode: ready, or a one-line error; never a wait without end -----------------
# First in the module: each starts its own 2-CPU local cluster, before the module's cluster exists.
def _ray_serve_env(tmp_path: Path, tiny_xtts: Path, **extra: str) -> dict[str, str]:
    """The reported set-up: the default engines (xtts with a checkpoint), a 2-CPU cluster, ray mode."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("TTS_GATEWAY_") and key not in ("RAY_ADDRESS", "KOKORO_JA_CACHE")}
    return {**env, "PYTHONPATH": str(ROOT), "TTS_GATEWAY_BACKEND": "ray", "TTS_GATEWAY_RAY_NUM_CPUS": "2",
            "TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_XTTS_CHECKPOINT": str(tiny_xtts),
            **extra}


def _mapped_libraries(pid: int) -> set[str]:
    """Shared libraries mapped into process ``pid`` (importing torch maps libtorch, onnxruntime its own)."""
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if ".so" in line}


def test_serve_in_ray_mode_with_the_default_engines_gets_ready_on_two_cpus(tmp_path: Path, tiny_xtts: Path) -> None:
    """The reported set-up reaches /ready; and the gateway process holds no model: registration and the
    legacy /synthesize upload are conditioned on the XTTS replica, and neither torch nor onnxruntime is
    ever loaded into the gateway (a module in ``sys.modules`` has its shared library mapped)."""
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

        xtts = httpx.get(server.base + "/v1/engines/xtts", timeout=HANG_GUARD_S).json()
        assert xtts["available"] and xtts["sample_rate"] == 24000 and "en" in xtts["languages"]
        assert xtts["model"]["sha256"] and any(v.startswith("xtts:") for v in xtts["voices"])  # studio speakers
        (replica,) = xtts["replicas"]
        assert replica["pid"] != server.process.pid and replica["loaded"]
        created = register(server.base, "remote", wav(voice_audio()), engine="xtts")
        assert created.status_code == 201, created.text
        assert created.json()["model"]["sha256"] == xtts["model"]["sha256"]
        spoken = httpx.post(server.base + "/v1/synthesize", json={"text": "A preset.", "voice": "remote", "seed": 2},
                            timeout=HANG_GUARD_S)
        assert spoken.status_code == 200 and spoken.headers["x-voice-sha256"] == created.json()["voice_sha256"]
        legacy = httpx.post(server.base + "/synthesize", data={"text": "The legacy call.", "language": "en"},
                            files={"speaker_audio": ("s.wav", wav(voice_audio(pitch=330)), "audio/wav")},
                            timeout=HANG_GUARD_S)
        assert legacy.status_code == 200, legacy.text
        audio, rate = decode(legacy.content)
        assert rate == 16000 and audio.ndim == 1 and audio.size > 0

        def conditioned() -> dict[str, float]:
            text = httpx.get(server.base + "/metrics", timeout=HANG_GUARD_S).text
            return _metric(text, "tts_conditioning_computations_total", engine="xtts")

        wait_until(lambda: conditioned() == {replica["id"]: 2.0}, "two conditionings counted on the xtts replica",
                   interval=0.2)

        # Two XTTS requests at once reach the replica's batcher and share GPT steps.
        def speak(i: int) -> int:
            return httpx.post(server.base + "/v1/synthesize", timeout=HANG_GUARD_S, json={
                "voice": xtts["voices"][0], "text": "One sentence here. Another one there. And a third one."}
            ).status_code

        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(speak, range(2))) == [200, 200]

        def shared_steps() -> float:
            text = httpx.get(server.base + "/metrics", timeout=HANG_GUARD_S).text
            steps = sum(_metric(text, "tts_batch_size_count", engine="xtts").values())
            alone = sum(_metric(text, "tts_batch_size_bucket", engine="xtts", le="1.0").values())
            return steps - alone

        wait_until(lambda: shared_steps() > 0, "an XTTS step with two sequences on the replica", interval=0.2)
        libraries = _mapped_libraries(server.process.pid)
        assert not [lib for lib in libraries if "torch" in lib or "onnxruntime" in lib], sorted(libraries)
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


def test_two_gateway_nodes_on_one_cluster_share_presets_through_postgresql(tmp_path: Path, postgres: Any) -> None:
    """An operator's set-up: a Ray cluster (`ray start --head`), two gateway nodes joined to it with one
    PostgreSQL registry. A voice registered through node A is spoken through node B on the same replicas."""
    import httpx

    from tests.conftest import free_port

    ray_dir = tempfile.mkdtemp(prefix="tts-ray-")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TTS_GATEWAY_", "RAY_"))} | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    head_log = tmp_path / "ray-head.log"
    with head_log.open("wb") as out:
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                 f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                                 "--object-store-memory=134217728", f"--temp-dir={ray_dir}",
                                 "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = postgres.new_database()
    nodes: list[GatewayProcess] = []
    try:
        for name in ("a", "b"):  # A deploys the engines; B finds them running and shares them
            node_env = {**env, "TTS_GATEWAY_BACKEND": "ray", "TTS_GATEWAY_RAY_ADDRESS": f"127.0.0.1:{port}",
                        "TTS_GATEWAY_REGISTRY_URL": url, "TTS_GATEWAY_ENGINES": "piper",
                        "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin",
                        "TTS_GATEWAY_DATA_DIR": str(tmp_path / f"node-{name}")}
            nodes.append(GatewayProcess(node_env, inherit=False))
            nodes[-1].wait_up("/ready", timeout=3 * HANG_GUARD_S)
        a, b = (node.base for node in nodes)
        assert "using the running Serve application tts-clone" in nodes[1].output()
        created = register(a, "shared", wav(voice_audio(pitch=250)), engine="clone")
        assert created.status_code == 201, created.text
        sha = created.json()["voice_sha256"]
        assert httpx.get(b + "/v1/voices/shared", timeout=HANG_GUARD_S).json()["voice_sha256"] == sha
        spoken = httpx.post(b + "/v1/synthesize", json={"text": "spoken on node b", "voice": "shared", "seed": 4},
                            timeout=HANG_GUARD_S)
        assert spoken.status_code == 200 and spoken.headers["x-voice-sha256"] == sha, spoken.text
        replicas = [httpx.get(base + "/v1/engines/clone", timeout=HANG_GUARD_S).json()["replicas"] for base in (a, b)]
        assert [r["id"] for r in replicas[0]] == [r["id"] for r in replicas[1]]  # one board, seen from both nodes
        for node in nodes:
            libraries = _mapped_libraries(node.process.pid)
            assert not [lib for lib in libraries if "onnxruntime" in lib], sorted(libraries)
    finally:
        for node in nodes:
            node.stop()
        head.terminate()  # `ray start --block` stops the cluster's processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayEnv]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("ray-data"), engines=("piper",),
                        plugins=("tests.fake_cloning_plugin",), engine_threads=1, max_concurrency=2,
                        timeout_s=60, canary=False, default_voice="piper:joe")
    gates = tmp_path_factory.mktemp("ray-gates")  # FAKE_GATE_DIR: see tests/fake_cloning_plugin.py
    core = build_core(settings, phrase_cache=False)
    core.voices.register("ray-clone", [("ref.wav", wav(voice_audio()))], engine_name="clone", consent=True)
    service, registry = core.service, core.registry
    backend = RayBackend(
        settings.with_(ray_num_cpus=2, ray_replicas=2, ray_replica_cpus=0.5), registry, engines=["piper", "clone"],
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


def test_ssml_pauses_and_rates_reach_the_replica(ray_env: RayEnv) -> None:
    """A plan's per-piece silence, speed and end pause travel in the job: the replica's bytes are the local ones."""
    document = ('<speak>Ray<break time="700ms"/><prosody rate="slow">runs slowly</prosody> on 3 nodes.'
                '<break time="300ms"/></speak>')
    plan = ray_env.service.plan(SynthesisRequest(text=document, voice="piper:joe", seed=5, text_format="ssml"))
    assert plan.pauses[1] == 0.7 and plan.rates[1] == 0.75 and plan.end_pause == 0.3
    assert asyncio.run(ray_env.backend.call(plan)) == local_bytes(ray_env, plan)


def test_streaming_yields_several_chunks_matching_local(ray_env: RayEnv) -> None:
    text = "First sentence here. A second one follows. And a third to finish."
    plan = ray_env.service.plan(SynthesisRequest(text=text, voice="piper:joe", seed=3, format="pcm", stream=True))
    assert plan.streams

    async def collect() -> list[bytes]:
        return [chunk async for chunk in ray_env.backend.stream(plan)]

    chunks = asyncio.run(collect())
    assert len(chunks) >= 3
    assert b"".join(chunks) == local_bytes(ray_env, plan)


def test_timed_requests_run_on_replicas_with_the_local_timings(ray_env: RayEnv) -> None:
    """Word timings are made where the engine runs and name the words as written (the word map travels in
    the job): whole and streamed, the replica's audio and timings are the local backend's."""
    from tts_gateway.core.timings import Timings
    from tts_gateway.engines.timing import input_words

    text = "Dr. Smith paid $42 on 3 May. Then he left."
    for stream in (False, True):
        plan = ray_env.service.plan(SynthesisRequest(text=text, voice="piper:joe", seed=4, format="pcm",
                                                     stream=stream, timestamps="word"))
        job = ray_env.backend.job(plan)
        assert plan.words is not None and job.timestamps == "word"
        assert SynthesisJob.from_dict(job.to_dict()) == job  # the word map travels as plain values
        local = list(ray_env.service.run_timed(plan, threading.Event()))
        local_audio, local_timings = b"".join(item.audio for item in local), Timings.of(local)
        assert [w.text for w in local_timings.words] == [w.text for w in input_words(text)]  # as written

        async def remote(plan: Any = plan, stream: bool = stream) -> tuple[bytes, Timings, int]:
            if not stream:
                audio, timings = await ray_env.backend.call_timed(plan)
                return audio, timings, 1
            first, rest = await ray_env.backend.open_timed_stream(plan)
            items = [first] + [item async for item in rest]
            return b"".join(item.audio for item in items), Timings.of(items), len(items)

        audio, timings, parts = asyncio.run(remote())
        assert audio == local_audio and len(audio) > 1000, stream
        assert timings == local_timings, stream
        assert parts >= (3 if stream else 1)
        assert timings.duration == pytest.approx(len(audio) / 2 / plan.rate, abs=0.01)


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

    async def queued() -> bool:
        return bool(router._metrics_manager.num_queued_requests >= count)

    await wait_until_async(queued, "the request to reach Serve's queue")


def test_backpressure_is_503_and_disconnect_cancels(ray_env: RayEnv) -> None:
    # 20 pieces of 4 words; the second holds at a gate that never opens, so the stream keeps the only slot
    # until the client leaves, however slow the machine.
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
        after: dict[str, Any] = {}

        async def idle() -> bool:
            try:
                after.update((await ray_env.backend.replica_stats("clone", calls=1))[0])
            except Exception:  # still busy: the cancelled stream has not released its slot yet
                return False
            return bool(after["running"] == 0)

        await wait_until_async(idle, "the replica to stop synthesizing after the disconnect", interval=0.05)
        assert after["cancelled"] == before["cancelled"] + 1, after  # cut short: it could never have ended
        return rejected.value

    error = asyncio.run(scenario())
    assert isinstance(error, Unavailable) and "busy" in error.detail
    assert error.retry_after is not None and error.retry_after >= 1
    # the slot is free again: a rejected request left nothing behind
    assert len(asyncio.run(ray_env.backend.call(quick))) > 44


def _metric(text: str, name: str, **labels: str) -> dict[str, float]:
    """Samples of ``name`` whose labels include ``labels``, by their ``replica`` label."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found[sample.labels.get("replica", "")] = found.get(sample.labels.get("replica", ""), 0) + sample.value
    return found


def test_through_the_app(ray_env: RayEnv) -> None:
    """End to end: Litestar in front, engines as stand-ins that know what the replicas report."""
    from litestar.testing import TestClient

    from tests.conftest import wait_for_warm_up
    from tts_gateway.gateway import create_app
    from tts_gateway.ray.engines import RemoteEngine

    settings = ray_env.settings.with_(data_dir=ray_env.settings.data_dir)  # same registry, same presets
    app = create_app(settings, backend=ray_env.backend)  # what TTS_GATEWAY_BACKEND=ray builds, on the shared cluster
    assert all(isinstance(app.state.tts.core.engines.get(n), RemoteEngine) for n in ("piper", "clone"))
    body = {"text": "Through the front door.", "voice": "piper:joe", "seed": 11, "cache": False}
    with TestClient(app, timeout=120) as client:
        wait_for_warm_up(client)
        assert client.get("/ready").status_code == 200
        response = client.post("/v1/synthesize", json=body)
        assert response.status_code == 200, response.text
        plan = ray_env.service.plan(SynthesisRequest(text=body["text"], voice="piper:joe", seed=11))
        assert response.content == local_bytes(ray_env, plan)
        streamed = client.post("/v1/synthesize", json={**body, "stream": True, "format": "pcm"})
        assert streamed.status_code == 200 and len(streamed.content) > 1000
        preset = client.post("/v1/synthesize", json={"text": "preset voice", "voice": ray_env.preset, "seed": 2})
        assert preset.status_code == 200 and preset.headers["x-voice-sha256"]

        # timestamps: words where the engine's replicas give them, 422 where they give only sentences
        timed = client.post("/v1/synthesize", json={**body, "timestamps": "word", "captions": "vtt"})
        assert timed.status_code == 200, timed.text
        answer = timed.json()
        assert [w["text"] for w in answer["words"]] == ["Through", "the", "front", "door"]
        assert answer["words"][-1]["end"] == pytest.approx(answer["duration"], abs=0.01)
        assert "WEBVTT" in answer["captions"] and answer["sentences"][0]["text"] == body["text"]
        events = client.post("/v1/synthesize", json={**body, "timestamps": "word", "stream": True, "format": "pcm"})
        assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
        assert '"Through"' in events.text and '"door"' in events.text
        words_of_clone = client.post("/v1/synthesize", json={"text": "no words here", "voice": ray_env.preset,
                                                             "timestamps": "word"})
        assert words_of_clone.status_code == 422 and "sentence" in words_of_clone.json()["detail"]
        sentences = client.post("/v1/synthesize", json={"text": "One. Two.", "voice": ray_env.preset,
                                                        "timestamps": "sentence"})
        assert sentences.status_code == 200 and len(sentences.json()["sentences"]) == 2

        # what the gateway knows about each engine comes from its replicas, one entry per replica
        piper = client.get("/v1/engines/piper").json()
        assert piper["available"] and piper["languages"] and piper["model"]["sha256"]
        assert "piper:joe" in piper["voices"] and piper["sample_rate"] == 22050
        assert len(piper["replicas"]) == 2 and len({r["pid"] for r in piper["replicas"]}) == 2
        assert all(r["loaded"] and r["last_report_s"] < 10 for r in piper["replicas"])
        clone = client.get("/v1/engines/clone").json()
        assert clone["capabilities"]["cloning"] and len(clone["replicas"]) == 1

        # registration: the latents are computed on the clone replica and counted there
        before = _metric(client.get("/metrics").text, "tts_conditioning_computations_total", engine="clone")
        created = register(client, "ray-app-clone", wav(voice_audio(pitch=330)), engine="clone")
        assert created.status_code == 201, created.text
        spoken = client.post("/v1/synthesize", json={"text": "new preset", "voice": "ray-app-clone", "seed": 3})
        assert spoken.status_code == 200 and spoken.headers["x-voice-sha256"] == created.json()["voice_sha256"]
        replica = clone["replicas"][0]["id"]

        def counted() -> bool:
            after = _metric(client.get("/metrics").text, "tts_conditioning_computations_total", engine="clone")
            return after.get(replica, 0) == before.get(replica, 0) + 1
        wait_until(counted, "the clone replica reports its conditioning", interval=0.2)
        assert "" not in _metric(client.get("/metrics").text, "tts_conditioning_computations_total")  # none here
        assert _metric(client.get("/metrics").text, "tts_synthesis_seconds_count", engine="piper")

        # load/unload act on every replica
        unloaded = client.post("/v1/engines/piper/unload")
        assert unloaded.status_code == 200, unloaded.text
        assert not unloaded.json()["loaded"] and not any(r["loaded"] for r in unloaded.json()["replicas"])
        loaded = client.post("/v1/engines/piper/load")
        assert loaded.status_code == 200 and all(r["loaded"] for r in loaded.json()["replicas"])
        assert client.post("/v1/synthesize", json=body).content == response.content


_GATEWAY_SCRIPT = """
import io, json, sys
from litestar.testing import TestClient
from tts_gateway.config import Settings
from tts_gateway.gateway import create_app

app = create_app(Settings.from_env())
app.state.backend.start()  # joins the cluster; the applications are running: shared, not redeployed
try:
    with TestClient(app, timeout=120) as client:
        created = client.post("/v1/voices", data={"name": "no-torch-here", "engine": "clone", "consent": "true"},
                              files={"audio": ("ref.wav", sys.stdin.buffer.read(), "audio/wav")})
        spoken = client.post("/v1/synthesize", json={"text": "No model here.", "voice": "no-torch-here"})
        builtin = client.post("/v1/synthesize", json={"text": "Nor here.", "voice": "piper:joe"})
        statuses = [created.status_code, spoken.status_code, builtin.status_code]
finally:
    app.state.backend.close()
heavy = ("torch", "torchaudio", "TTS", "onnxruntime", "piper", "kokoro_onnx")
print(json.dumps({"statuses": statuses, "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_a_gateway_process_in_ray_mode_imports_no_engine_library(ray_env: RayEnv, tmp_path: Path) -> None:
    """A fresh gateway process joined to the cluster registers a voice and synthesizes; afterwards
    neither torch nor onnxruntime (nor any engine library) is in its ``sys.modules``."""
    import json

    import ray

    env = {key: value for key, value in os.environ.items() if not key.startswith("TTS_GATEWAY_")} | {
        "PYTHONPATH": str(ROOT), "TTS_GATEWAY_BACKEND": "ray",
        "TTS_GATEWAY_RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # RAY_AUTH_TOKEN: inherited
        "TTS_GATEWAY_ENGINES": "piper", "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin",
        "TTS_GATEWAY_DATA_DIR": str(ray_env.settings.data_dir), "TTS_GATEWAY_CANARY": "0"}
    result = subprocess.run([sys.executable, "-c", _GATEWAY_SCRIPT], env=env, input=wav(voice_audio(pitch=440)),
                            capture_output=True, timeout=2 * HANG_GUARD_S)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report == {"statuses": [201, 200, 200], "imported": []}, report


def test_replicas_carry_out_orders_given_after_they_joined_and_leave_the_board(ray_env: RayEnv) -> None:
    """The board's protocol with a plain `Board` in this process (calls go through Ray's object store)."""
    import ray

    from tts_gateway.ray.board import Board, Reporter

    board = Board()

    class Method:  # an actor method's shape: ``.remote(...)`` gives something ``ray.get`` resolves
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            return ray.put(self.fn(*args))

    board.order("piper", "unload")  # before the replica exists: not for it
    done: list[str] = []
    reporter = Reporter("r1", lambda: {"engine": "piper", "loaded": True}, lambda: {"name": "piper"}, lambda: "",
                        lambda action: done.append(action) or "ok")
    reporter._board = type("Handle", (), {"report": Method(board.report), "leave": Method(board.leave)})()
    reporter.start()
    try:
        def order() -> dict[str, Any]:
            return dict(board.snapshot()["replicas"].get("r1", {}).get("order") or {})

        wait_until(lambda: order().get("seq") == 1, "the replica's first report")
        assert done == [] and board.snapshot()["replicas"]["r1"]["description"] == {"name": "piper"}
        board.order("piper", "load")
        wait_until(lambda: order().get("seq") == 2 and order().get("state") == "ok", "the load order done")
        assert done == ["load"]
    finally:
        reporter.stop()
    assert "r1" not in board.snapshot()["replicas"]  # it left at once: the gateway does not wait for it to go stale


# -- start-up that fits the cluster or says why it cannot ---------------------------------------------------
def test_replica_cpus_are_shared_out_or_the_shortfall_is_named() -> None:
    from tts_gateway.ray.cluster import plan_replica_cpus

    # Three engines on two free CPUs: two thirds each, not a wait for a third CPU that never comes.
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
    backend = RayBackend(ray_env.settings.with_(ray_replica_cpus=1.0), engines=["espeak"])
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
        assert backend.health() is None  # /ready: every engine has a live replica
    finally:
        serve.delete("tts-espeak")
    # The replica left the board when Serve stopped it: /ready names the engine without a replica.
    wait_until(lambda: backend.health() is not None, "the gateway sees that tts-espeak has no replica")
    assert backend.health() == "no live replica of tts-espeak on the Ray cluster"
    backend.view.close()
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
    wait_until(lambda: "tts-espeak" not in serve.status().applications,  # deleted: it holds nothing
               "tts-espeak to be deleted after the failed start", interval=0.2)
