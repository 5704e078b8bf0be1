"""Scale-out: TTS_GATEWAY_REGISTRY_URL makes PostgreSQL the voice registry shared by several gateways.

The throwaway PostgreSQL server (one per session, a database per test) comes from tests/pg.py; the
registry contract both backends share is tested in tests/test_registry.py.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import psycopg.errors
import pytest

from tests.conftest import (
    HANG_GUARD_S,
    ROOT,
    GatewayProcess,
    assert_problem,
    decode,
    free_port,
    metric,
    register,
    run_threads,
    running_app,
    voice_audio,
    wav,
)
from tests.fake_cloning_plugin import FakeCloningEngine
from tests.fake_engine import FakePlugin
from tests.pg import PASSWORD, PgServer, unavailable
from tests.test_registry import create, never, reference
from tests.test_reliability import start_server
from tts_gateway.config import Settings, SettingsError
from tts_gateway.errors import InvalidField
from tts_gateway.voices import (
    LocalVoiceRegistry,
    PostgresVoiceRegistry,
    RegistryConnectError,
    RegistryUnavailable,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRegistry,
    open_registry,
    pg_schema,
)

CONDITIONING = "tts_conditioning_computations_total"

pytest_plugins = ["tests.pg_fixtures"]  # the postgres and pg_url fixtures
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


def speak(base: str, voice: str) -> httpx.Response:
    return httpx.post(base + "/v1/synthesize", json={"text": "hello there", "voice": voice}, timeout=HANG_GUARD_S)


# -- settings and wiring -------------------------------------------------------------------------------
def test_registry_url_setting() -> None:
    assert Settings.from_env({}).registry_url is None
    url = "postgresql://tts:hunter2@db.internal:5432/voices"
    settings = Settings.from_env({"TTS_GATEWAY_REGISTRY_URL": url})
    assert settings.registry_url == url
    assert "hunter2" not in repr(settings)
    assert Settings.from_env({"TTS_GATEWAY_REGISTRY_URL": "postgres://db/x"}).registry_url == "postgres://db/x"
    for bad in ("mysql://db/x", "db.internal:5432", "sqlite:///tmp/x"):
        with pytest.raises(SettingsError, match="TTS_GATEWAY_REGISTRY_URL"):
            Settings.from_env({"TTS_GATEWAY_REGISTRY_URL": bad})


def test_open_registry_chooses_by_url(tmp_path: Path, pg_url: str) -> None:
    local = open_registry(Settings(data_dir=tmp_path / "a"))
    assert type(local) is LocalVoiceRegistry
    assert isinstance(local, VoiceRegistry)
    local.close()
    shared = open_registry(Settings(data_dir=tmp_path / "b", registry_url=pg_url))
    assert isinstance(shared, PostgresVoiceRegistry) and isinstance(shared, VoiceRegistry)
    assert PASSWORD not in repr(shared)
    shared.close()


def test_same_interface_as_voice_registry() -> None:
    public = [n for n, v in vars(VoiceRegistry).items() if callable(v) and not n.startswith("_")]
    assert set(public) >= {"get", "exists", "records", "latents", "load_latents", "forget", "condition", "create",
                           "delete", "check", "close"}
    for implementation in (LocalVoiceRegistry, PostgresVoiceRegistry):
        assert VoiceRegistry not in implementation.__mro__  # siblings that match the protocol, not subclasses
        own = implementation.__mro__[:-1]  # the class and its shared base, not `object`
        for name in public:
            assert any(name in vars(cls) for cls in own), f"{implementation.__name__}.{name} is missing"
            assert inspect.signature(getattr(implementation, name)) == inspect.signature(
                getattr(VoiceRegistry, name)), (implementation.__name__, name)
    params = inspect.signature(PostgresVoiceRegistry).parameters
    assert {"url", "on_conditioning", "on_cache_hit", "memory_entries"} <= set(params)


class FakeClock:
    """Stands in for the ``time`` module of the registry: only its own sleeps move it on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_unreachable_database_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clear error once ``connect_timeout`` has run out: retried meanwhile, never longer.

    The registry's retry loop runs on a fake clock that only its sleeps advance, so "gave up within 0.5 s
    of retrying" is checked exactly, however long a refused connection takes on this machine.
    """
    clock = FakeClock()
    monkeypatch.setattr(pg_schema, "time", clock)
    url = f"postgresql://tts:{PASSWORD}@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(RegistryConnectError) as info:
        PostgresVoiceRegistry(tmp_path, url=url, connect_timeout=0.5)
    assert "TTS_GATEWAY_REGISTRY_URL" in str(info.value) and PASSWORD not in str(info.value)
    assert clock.sleeps, "it gave up without retrying"
    assert clock.now <= 0.5, f"it kept retrying for {clock.now:g} s of a 0.5 s connect timeout"


# -- two gateway processes, one database -----------------------------------------------------------------
@dataclass
class Gateways:
    url: str
    bases: list[str]
    processes: list[GatewayProcess]
    tmp: Path
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def barrier(self) -> Path:
        """The fake cloning engine's latent barrier (FAKE_LATENT_BARRIER_DIR; see tests/fake_cloning_plugin.py)."""
        return self.tmp / "latent-barrier"

    def arm_barrier(self, parties: int) -> None:
        """From now on every latent computation, on either node, waits until ``parties`` have started."""
        self.disarm_barrier()
        armed = self.barrier / "parties.new"
        armed.write_text(str(parties))
        armed.replace(self.barrier / "parties")  # atomically: a node never reads half of it

    def disarm_barrier(self) -> None:
        (self.barrier / "parties").unlink(missing_ok=True)
        for arrived in self.barrier.glob("arrived-*"):
            arrived.unlink()

    def launch(self, data: Path) -> tuple[GatewayProcess, str]:
        port = free_port()
        process = start_server(data, port, TTS_GATEWAY_REGISTRY_URL=self.url,
                               FAKE_LATENT_BARRIER_DIR=str(self.barrier))
        return process, f"http://127.0.0.1:{port}"

    def restart(self, index: int, data: Path) -> None:
        self.stop(index)
        self.processes[index], self.bases[index] = self.launch(data)
        self.processes[index].wait_up()

    def stop(self, index: int) -> None:
        self.processes[index].stop()


@pytest.fixture(scope="module")
def gateways(postgres: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    """Gateways A and B: the `clone` engine, each its own data dir, one TTS_GATEWAY_REGISTRY_URL."""
    tmp = tmp_path_factory.mktemp("gateways")
    pair = Gateways(postgres.new_database(), [], [], tmp)
    pair.barrier.mkdir()
    try:
        for index in range(2):  # started together: they also race to create the schema
            process, base = pair.launch(tmp / f"node{index}")
            pair.processes.append(process)
            pair.bases.append(base)
        for server in pair.processes:
            server.wait_up()
        yield pair
    finally:
        for index in range(len(pair.processes)):
            pair.stop(index)


def test_voice_registered_on_one_node_speaks_on_the_other(gateways: Gateways) -> None:
    a, b = gateways.bases
    created = register(a, "shared", wav(voice_audio(pitch=230)), engine="clone")
    assert created.status_code == 201, created.text
    sha = created.json()["voice_sha256"]
    assert httpx.get(b + "/v1/voices/shared", timeout=HANG_GUARD_S).json()["voice_sha256"] == sha
    response = speak(b, "shared")
    assert response.status_code == 200, response.text
    assert response.headers["x-voice-sha256"] == sha
    audio, _rate = decode(response.content)
    assert audio.size > 0
    assert metric(a, CONDITIONING) == 1
    assert metric(b, CONDITIONING) == 0  # B never computed latents: it read A's blob from PostgreSQL
    cached = gateways.tmp / "node1" / "voices" / "pg-cache" / "blobs" / sha[:2] / f"{sha}.safetensors"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == sha  # now in B's local cache
    gateways.results["shared"] = sha


def test_two_nodes_creating_one_name_give_one_201_and_one_409(gateways: Gateways) -> None:
    a, b = gateways.bases
    before = [metric(a, CONDITIONING), metric(b, CONDITIONING)]
    barrier = threading.Barrier(2)
    responses: dict[str, httpx.Response] = {}

    def attempt(index: int) -> None:
        base, pitch = ((a, 300), (b, 400))[index]
        barrier.wait()
        responses[base] = register(base, "race", wav(voice_audio(pitch=pitch)), engine="clone")

    gateways.arm_barrier(2)  # neither registration can commit before both are computing latents
    try:
        run_threads(2, attempt)
    finally:
        gateways.disarm_barrier()
    statuses = sorted(r.status_code for r in responses.values())
    assert statuses == [201, 409], {k: (r.status_code, r.text) for k, r in responses.items()}
    loser = next(r for r in responses.values() if r.status_code == 409)
    assert_problem(loser, 409, "already exists")
    # Both computed latents, so both got past the early name check: the database decided. By construction:
    # the latent barrier held each until the other had started, however the two were scheduled.
    assert [metric(a, CONDITIONING), metric(b, CONDITIONING)] == [before[0] + 1, before[1] + 1]
    winner = next(r for r in responses.values() if r.status_code == 201).json()["voice_sha256"]
    for base in (a, b):
        assert httpx.get(base + "/v1/voices/race", timeout=HANG_GUARD_S).json()["voice_sha256"] == winner
        assert speak(base, "race").headers["x-voice-sha256"] == winner
    gateways.results["race"] = winner


def test_delete_on_one_node_is_seen_by_the_other(gateways: Gateways) -> None:
    a, b = gateways.bases
    assert register(a, "short-lived", wav(voice_audio(pitch=250)), engine="clone").status_code == 201
    assert speak(b, "short-lived").status_code == 200
    assert httpx.delete(b + "/v1/voices/short-lived", timeout=HANG_GUARD_S).status_code == 204
    assert_problem(speak(a, "short-lived"), 404, "unknown voice")
    assert httpx.delete(a + "/v1/voices/short-lived", timeout=HANG_GUARD_S).status_code == 404


def test_records_survive_a_gateway_restart(gateways: Gateways) -> None:
    assert set(gateways.results) == {"shared", "race"}, "runs after the tests that register voices"
    gateways.restart(0, gateways.tmp / "node0-new")  # a new node: empty data dir, nothing cached
    a = gateways.bases[0]
    names = {v["name"] for v in httpx.get(a + "/v1/voices", timeout=HANG_GUARD_S).json()["voices"]}
    assert {"shared", "race"} <= names
    for name, sha in gateways.results.items():
        response = speak(a, name)
        assert response.status_code == 200, response.text
        assert response.headers["x-voice-sha256"] == sha
    assert metric(a, CONDITIONING) == 0


@pytest.mark.slow  # stops and starts the database server
def test_database_outage_is_503_and_recovers(gateways: Gateways, postgres: PgServer, tmp_path: Path) -> None:
    b = gateways.bases[1]
    registry = PostgresVoiceRegistry(tmp_path, url=gateways.url)
    try:
        assert registry.exists("shared")
        postgres.stop()
        try:
            with pytest.raises(RegistryUnavailable):
                registry.get("shared")
            # The listing too: a 200 with the built-ins alone would read as if the presets had been deleted.
            for path in ("/v1/voices/shared", "/v1/voices"):
                response = httpx.get(b + path, timeout=HANG_GUARD_S)
                assert_problem(response, 503, "registry database")
                assert response.headers["retry-after"]
        finally:
            postgres.start()
        assert registry.get("shared").voice_sha256 == gateways.results["shared"]  # a stale connection is replaced
        assert httpx.get(b + "/v1/voices/shared", timeout=HANG_GUARD_S).status_code == 200
        listed = httpx.get(b + "/v1/voices", timeout=HANG_GUARD_S)
        assert listed.status_code == 200 and "shared" in {v["name"] for v in listed.json()["voices"]}
        assert speak(b, "race").status_code == 200
    finally:
        registry.close()


# -- in process ---------------------------------------------------------------------------------------------
def test_corrupt_local_cache_file_is_refetched_never_served(tmp_path: Path, pg_url: str) -> None:
    settings = Settings(data_dir=tmp_path / "node", engines=("piper",), canary=False, registry_url=pg_url)
    with running_app(settings, FakePlugin(FakeCloningEngine())) as client:
        created = register(client, "cached", wav(voice_audio(pitch=210)), engine="clone")
        assert created.status_code == 201, created.text
        sha = created.json()["voice_sha256"]
        registry = client.app.state.tts.core.registry
        assert isinstance(registry, PostgresVoiceRegistry)
        path = registry.store.path(sha)
        good = path.read_bytes()
        first = client.post("/v1/synthesize", json={"text": "one two", "voice": "cached", "cache": False})
        assert first.status_code == 200

        for damage in (b"\0" * len(good), good[:-7], good[:40] + b"X" + good[41:], None):
            registry.cache.clear()  # as after a restart: the next read goes to the local file
            if damage is None:
                path.unlink()
            else:
                path.write_bytes(damage)
            response = client.post("/v1/synthesize", json={"text": "one two", "voice": "cached", "cache": False})
            assert response.status_code == 200, response.text
            assert response.headers["x-voice-sha256"] == sha
            assert response.content == first.content  # the real latents, not the damaged ones
            assert path.read_bytes() == good  # fetched again from PostgreSQL and re-cached
        assert list((registry.root / "quarantine").iterdir())  # damaged files are kept aside, not served
        assert client.get("/v1/voices/cached").json()["status"] == "ok"
        assert metric(client, CONDITIONING, engine="clone") == 1


def test_database_rejects_a_blob_whose_sha256_does_not_match(pg_url: str, tmp_path: Path) -> None:
    registry = PostgresVoiceRegistry(tmp_path, url=pg_url)  # creates the schema
    record = create(registry, "kept")
    registry.close()
    data = b"some latent bytes"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="tts_voice_blobs_sha256_matches"):
            conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)", ("0" * 64, data))
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)",
                         (hashlib.sha256(data).hexdigest(), data + b"!"))
        with pytest.raises(psycopg.errors.CheckViolation):  # nor can stored bytes be changed in place
            conn.execute("UPDATE tts_voice_blobs SET data = %s WHERE sha256 = %s", (data, record.latents_sha256))
        conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)",
                     (hashlib.sha256(data).hexdigest(), data))  # the right name is accepted
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # a blob in use cannot be deleted
            conn.execute("DELETE FROM tts_voice_blobs WHERE sha256 = %s", (record.latents_sha256,))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # a voice needs its blob
            conn.execute("UPDATE tts_voices SET latents_sha256 = %s, record = record || jsonb_build_object("
                         "'latents_sha256', %s::text) WHERE name = 'kept'", ("1" * 64, "1" * 64))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO tts_voices (name, latents_key, latents_sha256, record)"
                         " SELECT name, latents_key, latents_sha256, record FROM tts_voices WHERE name = 'kept'")


def test_concurrent_create_and_delete_of_one_name(tmp_path: Path, pg_url: str) -> None:
    registries = [PostgresVoiceRegistry(tmp_path / f"n{i % 2}", url=pg_url) for i in range(2)]

    def outcomes_of(count: int, done: str, act: Callable[[Any, int], object]) -> list[str]:
        """``act(registry, index)`` in ``count`` threads released together, alternating the two nodes: ``done``
        for each that returned, the exception's class name for each that raised."""
        barrier = threading.Barrier(count)
        outcomes: list[str] = []

        def attempt(index: int) -> None:
            barrier.wait()
            try:
                act(registries[index % 2], index)
                outcomes.append(done)
            except Exception as exc:
                outcomes.append(type(exc).__name__)

        run_threads(count, attempt)
        return outcomes

    refs = [reference(200 + index) for index in range(6)]
    outcomes = outcomes_of(6, "created", lambda registry, index: create(registry, "race", refs[index]))
    assert outcomes.count("created") == 1 and outcomes.count("VoiceExists") == 5, outcomes
    deleted = outcomes_of(4, "deleted", lambda registry, index: registry.delete("race"))
    assert deleted.count("deleted") == 1 and deleted.count("VoiceNotFound") == 3, deleted
    with pytest.raises(VoiceNotFound):
        registries[0].get("race")
    same = reference(333)  # the same audio on every thread: one blob, one upload-cache entry, still one winner
    outcomes = outcomes_of(6, "created", lambda registry, index: create(registry, "same", same))
    assert outcomes.count("created") == 1 and outcomes.count("VoiceExists") == 5, outcomes
    assert [set(r.latents(r.get("same"))) for r in registries] == [{"spectrum"}] * 2
    for registry in registries:  # the other node may still cache the deleted blob: fix drops it
        assert registry.check(fix=True)["broken"] == []
    for registry in registries:
        assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}
        registry.close()


def test_shared_blob_stays_until_its_last_voice_goes(tmp_path: Path, pg_url: str) -> None:
    registry = PostgresVoiceRegistry(tmp_path / "a", url=pg_url)
    one = create(registry, "one", reference(260))
    two = create(registry, "two", reference(260))  # same audio: same latents, one blob
    assert one.latents_sha256 == two.latents_sha256
    with pytest.raises(VoiceExists):
        create(registry, "two", reference(270))

    def blobs() -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM tts_voice_blobs").fetchone()
            return int(row[0]) if row else -1

    assert blobs() == 1
    registry.delete("one")
    assert blobs() == 1
    other = PostgresVoiceRegistry(tmp_path / "b", url=pg_url)  # another node, empty cache
    assert set(other.latents(other.get("two"))) == {"spectrum"}
    registry.delete("two")
    assert blobs() == 0
    assert not registry.store.exists(two.latents_sha256)
    with pytest.raises(VoiceNotFound):
        registry.delete("two")
    assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}
    stale = other.check()  # the other node still caches the deleted blob
    assert stale["orphans"] == [f"cache:{two.latents_sha256}"]
    other.check(fix=True)
    assert other.check() == {"broken": [], "orphans": [], "temp_files": []}
    registry.close()
    other.close()


def test_text_postgresql_cannot_hold_is_a_422_before_any_work(tmp_path: Path, pg_url: str) -> None:
    registry = PostgresVoiceRegistry(tmp_path, url=pg_url)
    for description in ("nul\x00inside", "lone \ud800 surrogate"):
        with pytest.raises(InvalidField, match="description"):
            registry.create("odd", engine="clone", reference=reference(), compute=never, model_id="m",
                            model_sha256="0" * 64, licence="x", description=description)
    assert not registry.exists("odd")
    registry.close()


def test_upload_cache_is_shared_by_nodes(tmp_path: Path, pg_url: str) -> None:
    hits: list[str] = []
    computed: list[str] = []
    a = PostgresVoiceRegistry(tmp_path / "a", url=pg_url, on_conditioning=computed.append)
    b = PostgresVoiceRegistry(tmp_path / "b", url=pg_url, on_conditioning=computed.append, on_cache_hit=hits.append)
    ref = reference(280)
    key, sha, latents = a.condition(ref, "clone", "0" * 64, FakeCloningEngine().compute_latents)
    key_b, sha_b, latents_b = b.condition(ref, "clone", "0" * 64, never)
    assert (key_b, sha_b) == (key, sha) and computed == ["clone"] and hits == ["clone"]
    np.testing.assert_array_equal(latents_b["spectrum"], latents["spectrum"])
    assert b.store.exists(sha)
    assert a.check() == {"broken": [], "orphans": [], "temp_files": []}  # the upload cache references its blob
    a.close()
    b.close()


def test_unreadable_blob_in_database_marks_the_voice_broken(tmp_path: Path, pg_url: str) -> None:
    registry = PostgresVoiceRegistry(tmp_path, url=pg_url)
    create(registry, "fine", reference(290))
    junk = b"not safetensors at all"
    junk_sha = hashlib.sha256(junk).hexdigest()
    with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)", (junk_sha, junk))
        conn.execute("INSERT INTO tts_voices (name, latents_key, latents_sha256, record) SELECT 'bad', latents_key,"
                     " %s, record || jsonb_build_object('name', 'bad', 'latents_sha256', %s::text)"
                     " FROM tts_voices WHERE name = 'fine'", (junk_sha, junk_sha))
    assert registry.check()["broken"] == ["bad"]
    with pytest.raises(VoiceBroken, match="delete it and register it again"):
        registry.latents(registry.get("bad"))
    assert registry.get("bad").status == "broken"
    assert registry.get("fine").status == "ok"
    registry.delete("bad")
    assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}
    registry.close()


def test_cli_registry_check_uses_the_database(tmp_path: Path, pg_url: str) -> None:
    registry = PostgresVoiceRegistry(tmp_path / "a", url=pg_url)
    create(registry, "listed", reference(310))
    registry.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TTS_GATEWAY_DATA_DIR": str(tmp_path / "cli"),
           "TTS_GATEWAY_REGISTRY_URL": pg_url}
    done = subprocess.run([sys.executable, "-m", "tts_gateway", "registry", "check"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"broken": []' in done.stdout
