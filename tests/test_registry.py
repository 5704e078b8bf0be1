"""The voice registry contract, on both backends, and that racing registrations keep every voice.

Every test taking ``backend`` runs on `LocalVoiceRegistry` (a temp dir) and on `PostgresVoiceRegistry` (a
throwaway PostgreSQL server from tests/pg.py; skipped, with the reason, where the server binaries are
missing). "Reopen" means a new registry object with an empty memory cache: a restart of the local
gateway, or another node of the PostgreSQL one.

The race tests send ``POST /v1/voices`` at once under different names with one clip the registry has not
seen: every voice acknowledged with 201 keeps a stored blob with exactly its voice_sha256, and still loads
after a restart.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from safetensors.numpy import load as st_load

from tests.conftest import run_threads, voice_audio, wav
from tests.fake_cloning_plugin import FakeCloningEngine
from tts_gateway.voices import (
    CorruptBlob,
    LatentCache,
    LocalVoiceRegistry,
    PostgresVoiceRegistry,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
    prepare_reference,
)
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.blobs import blob_metadata, encode, read_metadata
from tts_gateway.voices.local_index import pointer_entries
from tts_gateway.voices.registry import latents_key

pytest_plugins = ["tests.pg_fixtures"]  # the postgres and pg_url fixtures

RATE = 16000
MODEL = "0" * 64


# -- helpers ---------------------------------------------------------------------------------------------------
def reference(pitch: float = 220.0, seconds: float = 3.0) -> ReferenceAudio:
    """The suite's test tone at ``pitch``, prepared as the registry receives an upload."""
    return prepare_reference([("a.wav", wav(voice_audio(seconds, pitch, RATE), RATE))], RATE)


class Compute:
    """The fake cloning engine's ``compute_latents``, counted; ``noisy`` models an engine whose conditioning is
    not bit-exact from one run to the next (so two computations of one clip give two different blobs)."""

    def __init__(self, delay: float = 0.0, noisy: bool = False) -> None:
        self.delay = delay
        self.noisy = noisy
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        latents = FakeCloningEngine().compute_latents(samples)
        if self.noisy:
            latents["spectrum"] = latents["spectrum"] + np.float32(random.uniform(1e-4, 1e-3))
        return latents


def never(samples: np.ndarray) -> dict[str, np.ndarray]:
    raise AssertionError("latents were computed again")


def create(registry: VoiceRegistry, name: str, ref: ReferenceAudio | None = None, compute: Any = None,
           **fields: Any) -> VoiceRecord:
    return registry.create(name, engine="clone", reference=ref or reference(), compute=compute or Compute(),
                           model_id="clone/1", model_sha256=MODEL, licence="CC0-1.0", **fields)


def race(count: int, create_one: Callable[[int], VoiceRecord]) -> tuple[dict[str, str], list[BaseException]]:
    """``create_one(0)`` … ``create_one(count - 1)`` in threads released together: the voices acknowledged
    (name to voice_sha256) and the errors raised."""
    barrier = threading.Barrier(count)
    acknowledged: dict[str, str] = {}
    errors: list[BaseException] = []

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            record = create_one(index)
            acknowledged[record.name] = record.voice_sha256
        except BaseException as exc:
            errors.append(exc)

    run_threads(count, attempt)
    return acknowledged, errors


CLEAN = {"broken": [], "orphans": [], "temp_files": []}


@dataclass
class Backend:
    """Opens registries of one backend over one store, and reaches into that store the way damage would."""

    name: str
    tmp: Path
    url: str | None = None
    opened: list[Any] = field(default_factory=list)

    def open(self, node: str = "a", **kwargs: Any) -> Any:
        """A registry object. Local: always the same data dir. PostgreSQL: ``node`` picks the local cache dir."""
        if self.url is None:
            registry: Any = LocalVoiceRegistry(self.tmp / "data", **kwargs)
        else:
            registry = PostgresVoiceRegistry(self.tmp / node, url=self.url, **kwargs)
        self.opened.append(registry)
        return registry

    def close_all(self) -> None:
        for registry in self.opened:
            registry.close()

    def blob(self, registry: Any, record: VoiceRecord) -> bytes | None:
        """The stored bytes of a record's blob (what survives a restart), None if there are none."""
        if self.url is None:
            return registry.store.read(record.latents_key)
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT data FROM tts_voice_blobs WHERE sha256 = %s",
                               (record.latents_sha256,)).fetchone()
        return bytes(row[0]) if row else None

    def corrupt(self, registry: Any, name: str) -> None:
        """Make a voice's stored latents unusable."""
        record = registry.get(name)
        if self.url is None:
            path = registry.store.path(record.latents_key)
            data = bytearray(path.read_bytes())
            data[-5] ^= 0xFF
            path.write_bytes(bytes(data))
            return
        junk = b"not safetensors at all"  # the database refuses changed bytes: point the voice at junk instead
        sha = hashlib.sha256(junk).hexdigest()
        with psycopg.connect(self.url, autocommit=True) as conn, conn.transaction():
            conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)", (sha, junk))
            conn.execute("UPDATE tts_voices SET latents_sha256 = %s, record = record || jsonb_build_object("
                         "'latents_sha256', %s::text) WHERE name = %s", (sha, sha, name))

    def orphan(self, registry: Any) -> str:
        """A stored blob nothing refers to; returns how ``check`` names it."""
        data = encode({"spectrum": np.arange(4, dtype=np.float32)}, {"engine": "clone"})
        sha = hashlib.sha256(data).hexdigest()
        if self.url is None:
            key = hashlib.sha256(b"nobody's").hexdigest()
            assert registry.store.write(key, data)
            return key
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)", (sha, data))
        return sha

    def upload_entries(self, registry: Any) -> set[str]:
        """Keys of the upload-cache entries no preset uses."""
        if self.url is None:
            presets = {r.latents_key for r in registry.records()}
            return set(pointer_entries(registry.index)) - presets
        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT key FROM tts_conditioning c WHERE NOT EXISTS"
                                " (SELECT 1 FROM tts_voices v WHERE v.latents_key = c.key)").fetchall()
        return {row[0] for row in rows}

    def blob_count(self, registry: Any) -> int:
        if self.url is None:
            return len(registry.store.keys())
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT count(*) FROM tts_voice_blobs").fetchone()
        return int(row[0]) if row else 0

    def temp_file(self, registry: Any) -> Path:
        """A half-written blob left by a crash."""
        path = registry.store.root / "ab" / ".tmp-crashed.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        return path


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    chosen = Backend(request.param, tmp_path, url)
    try:
        yield chosen
    finally:
        chosen.close_all()


def assert_intact(backend: Backend, acknowledged: dict[str, str]) -> None:
    """Reopened, every acknowledged voice is listed with its voice_sha256, its stored blob has exactly that
    sha256, and its latents load; nothing is broken or orphaned."""
    registry = backend.open(node="fresh")
    for name, sha in acknowledged.items():
        record = registry.get(name)
        assert record.voice_sha256 == sha, name
        stored = backend.blob(registry, record)
        assert stored is not None, f"{name}: blob is missing"
        assert hashlib.sha256(stored).hexdigest() == sha, f"{name}: the stored blob is a different one"
        assert set(registry.latents(record)) == {"spectrum"}
        assert registry.get(name).status == "ok"
    assert registry.check() == CLEAN


# -- the contract ----------------------------------------------------------------------------------------------
def test_both_backends_implement_the_protocol(tmp_path: Path) -> None:
    local = LocalVoiceRegistry(tmp_path)
    assert isinstance(local, VoiceRegistry)
    assert local.health() is None
    local.close()
    for implementation in (LocalVoiceRegistry, PostgresVoiceRegistry):
        assert VoiceRegistry not in implementation.__mro__
        assert LocalVoiceRegistry not in implementation.__mro__[1:]
        assert not hasattr(implementation, "_memory")  # the memory cache has one name: ``cache``
    with pytest.raises(TypeError):
        VoiceRegistry(tmp_path)  # type: ignore[misc,call-arg]  # a protocol, not a constructor


def test_create_get_exists_records_latents_delete(backend: Backend) -> None:
    registry = backend.open()
    ref = reference(230)
    compute = Compute()
    record = create(registry, "alice", ref, compute, language="en", description="Alice", consent=True)
    assert (record.name, record.engine, record.model_id, record.model_sha256, record.licence) == (
        "alice", "clone", "clone/1", MODEL, "CC0-1.0")
    assert (record.language, record.description, record.consent, record.status) == ("en", "Alice", True, "ok")
    assert record.audio_sha256 == ref.sha256 and record.clip_sha256s == list(ref.clip_sha256s)
    assert record.duration == pytest.approx(ref.duration, abs=0.001)
    assert record.latents_key == latents_key(ref.sha256, "clone", MODEL)
    assert time.strptime(record.created_at, "%Y-%m-%dT%H:%M:%SZ")
    stored = backend.blob(registry, record)
    assert stored is not None and record.voice_sha256 == hashlib.sha256(stored).hexdigest()
    assert compute.calls == 1

    assert registry.get("alice") == record
    assert registry.exists("alice")
    for missing in ("bob", "Alice", "../alice", "alice\n", "", "a" * 65):
        assert not registry.exists(missing)
        with pytest.raises(VoiceNotFound):
            registry.get(missing)
    latents = registry.latents(record)
    expected = FakeCloningEngine().compute_latents(ref.samples)
    assert latents["spectrum"].dtype == np.float32
    np.testing.assert_array_equal(latents["spectrum"], expected["spectrum"])

    bob = create(registry, "bob", reference(240))
    assert [r.name for r in registry.records()] == ["alice", "bob"]
    with pytest.raises(ValueError):
        create(registry, "Not A Name", reference(250), never)

    assert registry.delete("alice") == record
    with pytest.raises(VoiceNotFound):
        registry.get("alice")
    with pytest.raises(VoiceNotFound):
        registry.delete("alice")
    with pytest.raises(VoiceNotFound):
        registry.delete("../bob")
    assert [r.name for r in registry.records()] == ["bob"]
    assert backend.blob(registry, record) is None  # its blob went with its last user
    registry.delete("bob")
    assert backend.blob(registry, bob) is None
    assert registry.records() == []
    assert registry.check() == CLEAN


def test_a_taken_name_conflicts(backend: Backend) -> None:
    registry = backend.open()
    first = create(registry, "taken", reference(260))
    with pytest.raises(VoiceExists, match="already exists"):
        create(registry, "taken", reference(270), never)  # refused before any work
    assert registry.get("taken").voice_sha256 == first.voice_sha256
    assert backend.open(node="b").get("taken") == first


def test_conditioning_is_stored_once_and_reused(backend: Backend) -> None:
    hits: list[str] = []
    computed: list[str] = []
    registry = backend.open(on_conditioning=computed.append, on_cache_hit=hits.append)
    ref = reference(280)
    compute = Compute()
    key, sha, latents = registry.condition(ref, "clone", MODEL, compute)
    assert key == latents_key(ref.sha256, "clone", MODEL)
    again = registry.condition(ref, "clone", MODEL, never)
    assert again[:2] == (key, sha)
    np.testing.assert_array_equal(again[2]["spectrum"], latents["spectrum"])
    assert (computed, hits, compute.calls) == (["clone"], ["clone"], 1)
    preset = create(registry, "from-upload", ref, never)  # a preset of the same audio reuses the blob
    assert preset.voice_sha256 == sha and hits == ["clone", "clone"]
    other_hits: list[str] = []
    reopened = backend.open(node="b", on_cache_hit=other_hits.append)
    assert reopened.condition(ref, "clone", MODEL, never)[:2] == (key, sha)
    assert other_hits == ["clone"]
    assert registry.check() == CLEAN  # the upload cache's blob is referenced, not an orphan


def test_same_audio_shares_one_blob_until_the_last_voice_goes(backend: Backend) -> None:
    registry = backend.open()
    compute = Compute()
    one = create(registry, "one", reference(290), compute)
    two = create(registry, "two", reference(290), compute)
    assert one.voice_sha256 == two.voice_sha256 and compute.calls == 1
    registry.delete("one")
    reopened = backend.open(node="b")
    assert set(reopened.latents(reopened.get("two"))) == {"spectrum"}
    assert backend.blob(reopened, two) is not None
    registry.delete("two")
    assert backend.blob(registry, two) is None


def test_load_latents_verifies_and_forget_drops_from_memory(backend: Backend) -> None:
    registry = backend.open()
    record = create(registry, "loaded", reference(300))
    latents = registry.load_latents(record.latents_key, record.latents_sha256)
    assert set(latents) == {"spectrum"}
    assert record.latents_sha256 in registry.cache
    registry.forget(record.latents_sha256)
    assert record.latents_sha256 not in registry.cache
    again = registry.load_latents(record.latents_key, record.latents_sha256)  # from storage, verified again
    np.testing.assert_array_equal(again["spectrum"], latents["spectrum"])
    with pytest.raises(CorruptBlob):
        registry.load_latents(record.latents_key, "f" * 64)  # bytes that do not match the asked sha256
    # ... and the blob another voice uses is neither quarantined nor marked broken for that.
    registry.forget(record.latents_sha256)
    assert set(registry.latents(registry.get("loaded"))) == {"spectrum"}
    assert registry.get("loaded").status == "ok"
    assert registry.check() == CLEAN


def test_corrupt_latents_break_that_voice_only(backend: Backend) -> None:
    registry = backend.open()
    create(registry, "good", reference(310))
    create(registry, "bad", reference(320))
    backend.corrupt(registry, "bad")
    reopened = backend.open(node="b")  # nothing in memory: storage is read
    with pytest.raises(VoiceBroken, match="delete it and register it again"):
        reopened.latents(reopened.get("bad"))
    assert reopened.get("bad").status == "broken"
    assert set(reopened.latents(reopened.get("good"))) == {"spectrum"}
    assert reopened.get("good").status == "ok"
    assert reopened.check()["broken"] == ["bad"]
    reopened.check(fix=True)
    assert reopened.check()["broken"] == ["bad"]  # fixing marks; only a delete removes a broken voice
    reopened.delete("bad")
    assert reopened.check() == CLEAN
    assert set(reopened.latents(reopened.get("good"))) == {"spectrum"}


def test_check_fix_removes_orphans_and_temp_files(backend: Backend) -> None:
    registry = backend.open()
    create(registry, "kept", reference(330))
    orphan = backend.orphan(registry)
    temp = backend.temp_file(registry)
    report = registry.check()
    assert report == {"broken": [], "orphans": [orphan], "temp_files": [str(temp)]}
    assert registry.check(fix=True) == report
    assert registry.check() == CLEAN
    assert not temp.exists()
    assert set(backend.open(node="b").latents(registry.get("kept"))) == {"spectrum"}


def test_blobs_carry_their_origin(backend: Backend) -> None:
    registry = backend.open()
    record = create(registry, "origin", reference(340))
    stored = backend.blob(registry, record)
    assert stored is not None
    meta = read_metadata(stored)
    assert {k: meta[k] for k in ("engine", "model_sha256", "audio_sha256")} == {
        "engine": "clone", "model_sha256": MODEL, "audio_sha256": record.audio_sha256}
    assert latents_key(meta["audio_sha256"], meta["engine"], meta["model_sha256"]) == record.latents_key
    assert set(st_load(stored)) == {"spectrum"}


def test_health_is_none_while_the_registry_serves(backend: Backend) -> None:
    registry = backend.open()
    assert registry.health() is None
    registry.close()
    if backend.url is not None:  # a closed pool is what an unreachable database looks like to a caller
        reason = registry.health()
        assert reason is not None and "unavailable" in reason


# -- the upload cache's bound ----------------------------------------------------------------------------------
def test_the_upload_cache_is_bounded_least_recently_used_first(backend: Backend) -> None:
    """Clips conditioned without a preset (the legacy ``/synthesize`` upload) are kept up to the bound, the least
    recently used evicted first with its blob; a preset's blob is never evicted."""
    registry = backend.open(upload_cache_entries=3)
    kept = create(registry, "kept", reference(700))  # a preset's blob is never evicted
    refs = [reference(710 + 10 * i) for i in range(5)]
    compute = Compute()
    keys = [registry.condition(ref, "clone", MODEL, compute)[0] for ref in refs]
    assert backend.upload_entries(registry) == set(keys[2:])  # the two oldest went
    registry.condition(refs[2], "clone", MODEL, never)  # used again: now the most recent
    sixth = registry.condition(reference(770), "clone", MODEL, compute)[0]
    assert backend.upload_entries(registry) == {keys[2], keys[4], sixth}  # keys[3] was the least recently used
    assert backend.blob_count(registry) == 3 + 1  # evicted entries took their blobs with them
    for ref in (refs[2], refs[4]):
        registry.condition(ref, "clone", MODEL, never)
    calls = compute.calls
    registry.condition(refs[0], "clone", MODEL, compute)  # evicted: computed again
    assert compute.calls == calls + 1
    registry.forget(kept.latents_sha256)
    reopened = backend.open(node="b", upload_cache_entries=3)
    assert set(reopened.latents(reopened.get("kept"))) == {"spectrum"}
    assert registry.check() == CLEAN


def test_the_upload_cache_bound_holds_under_concurrent_use(backend: Backend) -> None:
    registry = backend.open(upload_cache_entries=2)
    create(registry, "anchor", reference(800))
    refs = [reference(810 + 10 * i) for i in range(6)]
    expected = {ref.sha256: FakeCloningEngine().compute_latents(ref.samples)["spectrum"] for ref in refs}
    failures: list[str] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        for _ in range(12):
            ref = rng.choice(refs)
            try:
                _key, _sha, latents = registry.condition(ref, "clone", MODEL, Compute())
                np.testing.assert_array_equal(latents["spectrum"], expected[ref.sha256])
            except BaseException as exc:
                failures.append(repr(exc))

    run_threads(4, worker)
    assert failures == []
    registry.condition(reference(900), "clone", MODEL, Compute())  # one more, with nothing else running
    assert len(backend.upload_entries(registry)) <= 2
    assert registry.check() == CLEAN
    assert set(backend.open(node="b").latents(registry.get("anchor"))) == {"spectrum"}


@pytest.mark.postgres
def test_a_version_1_schema_is_upgraded_and_its_upload_cache_bounded(pg_url: str, tmp_path: Path) -> None:
    from tts_gateway.voices.pg_schema import SCHEMA, SCHEMA_VERSION

    old = encode({"spectrum": np.arange(4, dtype=np.float32)}, {"engine": "clone"})
    old_sha = hashlib.sha256(old).hexdigest()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for statement in SCHEMA[:-2]:  # version 1: no used_at
            conn.execute(statement)
        conn.execute("INSERT INTO tts_registry_schema (version) VALUES (1)")
        conn.execute("INSERT INTO tts_voice_blobs (sha256, data) VALUES (%s, %s)", (old_sha, old))
        conn.execute("INSERT INTO tts_conditioning (key, latents_sha256, engine, model_sha256, audio_sha256)"
                     " VALUES (%s, %s, 'clone', %s, %s)", ("a" * 64, old_sha, MODEL, "b" * 64))
    registry = PostgresVoiceRegistry(tmp_path, url=pg_url, upload_cache_entries=1)
    try:
        key = registry.condition(reference(950), "clone", MODEL, Compute())[0]
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT max(version) FROM tts_registry_schema").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("SELECT key FROM tts_conditioning").fetchall() == [(key,)]  # version 1's row: evicted
            assert conn.execute("SELECT 1 FROM tts_voice_blobs WHERE sha256 = %s", (old_sha,)).fetchone() is None
        assert registry.check() == CLEAN
    finally:
        registry.close()


# -- blob bytes ------------------------------------------------------------------------------------------------
def test_the_same_latents_always_give_the_same_bytes() -> None:
    latents = FakeCloningEngine().compute_latents(reference(350).samples)
    latents["b_second"] = np.ones((2, 3), dtype=np.float32)
    meta = blob_metadata(engine="clone", model_sha256=MODEL, audio_sha256="a" * 64)
    first = encode(latents, meta)
    assert {encode(latents, meta) for _ in range(50)} == {first}
    shuffled = dict(reversed(list(latents.items())))  # insertion order does not matter either
    assert encode(shuffled, dict(reversed(list(meta.items())))) == first
    assert encode({k: v.astype(np.float64) for k, v in latents.items()}, meta) == first  # stored as float32
    loaded = st_load(first)
    assert set(loaded) == set(latents)
    for name, array in latents.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert read_metadata(first) == meta


# -- races -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noisy", [False, True], ids=["bit-exact-engine", "noisy-engine"])
def test_racing_creates_of_one_unseen_clip_keep_every_voice(backend: Backend, noisy: bool) -> None:
    """Eight ``POST /v1/voices`` at once, different names, one clip: one computation, one blob, eight voices
    that all still load after a restart."""
    hits: list[str] = []
    registry = backend.open(on_cache_hit=hits.append)
    compute = Compute(delay=0.3, noisy=noisy)
    ref = reference(440)
    acknowledged, errors = race(8, lambda index: create(registry, f"twin-{index}", ref, compute))
    assert errors == []
    assert len(acknowledged) == 8
    assert_intact(backend, acknowledged)
    assert compute.calls == 1, "the other seven must wait for the first computation and reuse it"
    assert len(hits) == 7
    assert len(set(acknowledged.values())) == 1


def test_racing_creates_on_two_registries_of_one_store(backend: Backend) -> None:
    """Two registry objects over one store (two nodes of one database; two processes on one data dir)."""
    registries = [backend.open(node="a"), backend.open(node="b")]
    compute = Compute(delay=0.3, noisy=True)  # each registry may compute: different bytes each time
    ref = reference(450)
    acknowledged, errors = race(6, lambda index: create(registries[index % 2], f"pair-{index}", ref, compute))
    assert errors == [] and len(acknowledged) == 6
    assert_intact(backend, acknowledged)
    assert compute.calls <= 2
    assert len(set(acknowledged.values())) == 1, "the first stored blob wins; the other registry uses it"


def test_create_and_delete_interleaved_on_one_clip(backend: Backend) -> None:
    """Presets of one clip created and deleted over and over from several threads, with the upload cache in
    use too: while a voice exists its blob is stored with exactly its voice_sha256, and it loads."""
    registry = backend.open()
    compute = Compute(noisy=True)  # a recomputation after a delete gives different bytes
    ref = reference(460)
    rounds = 12
    failures: list[str] = []
    acknowledged: dict[str, str] = {}
    stop = threading.Event()

    def preset_worker(index: int) -> None:
        name = f"churn-{index}"
        for round_ in range(rounds):
            try:
                record = create(registry, name, ref, compute)
            except BaseException as exc:
                failures.append(f"{name} create: {exc!r}")
                return
            stored = backend.blob(registry, record)
            if stored is None or hashlib.sha256(stored).hexdigest() != record.voice_sha256:
                failures.append(f"{name} round {round_}: acknowledged, but its blob is missing or another one")
            registry.forget(record.voice_sha256)
            try:
                registry.latents(registry.get(name))
            except BaseException as exc:
                failures.append(f"{name} round {round_}: {exc!r}")
            if round_ == rounds - 1:
                acknowledged[name] = record.voice_sha256
            else:
                registry.delete(name)

    def upload_worker() -> None:
        while not stop.is_set():
            try:
                registry.condition(ref, "clone", MODEL, compute)
            except BaseException as exc:
                failures.append(f"upload: {exc!r}")
                return

    uploads = threading.Thread(target=upload_worker)
    uploads.start()
    try:
        run_threads(3, preset_worker)
    finally:
        stop.set()
        uploads.join(60)
    assert failures == []
    assert len(acknowledged) == 3
    assert_intact(backend, acknowledged)


# -- local store: write once, quarantine only what nobody uses ---------------------------------------------------
def test_a_valid_blob_is_never_overwritten(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    ref = reference(470)
    key, sha, _ = registry.condition(ref, "clone", MODEL, Compute(noisy=True))
    path = registry.store.path(key)
    before = path.read_bytes()
    registry.index.delete(f"audio:{key}")  # as after a crash between the blob and its upload-cache entry
    registry.cache.clear()
    assert registry.check()["orphans"] == [key]
    again = registry.condition(ref, "clone", MODEL, never)  # the blob on disk is adopted, not recomputed
    assert again[:2] == (key, sha)
    assert path.read_bytes() == before
    assert registry.check() == CLEAN
    registry.close()


def test_a_stale_record_does_not_quarantine_a_blob_other_voices_use(tmp_path: Path) -> None:
    """Two records of one clip, one naming bytes the shared file does not hold: only that one is broken; the
    blob the other uses is neither quarantined nor touched."""
    registry = LocalVoiceRegistry(tmp_path)
    one = create(registry, "one", reference(480))
    two = create(registry, "two", reference(480))
    stale = VoiceRecord.from_json(registry.index.get("voice:one"))
    stale.latents_sha256 = "f" * 64
    registry.index.set("voice:one", stale.to_json())
    registry.close()

    reopened = LocalVoiceRegistry(tmp_path)
    with pytest.raises(VoiceBroken):
        reopened.latents(reopened.get("one"))
    assert reopened.store.sha256_of(two.latents_key) == two.voice_sha256  # still there, untouched
    assert set(reopened.latents(reopened.get("two"))) == {"spectrum"}
    assert reopened.check()["broken"] == ["one"]
    reopened.check(fix=True)
    reopened.cache.clear()
    assert set(reopened.latents(reopened.get("two"))) == {"spectrum"}
    assert not (reopened.root / "quarantine").exists() or not list((reopened.root / "quarantine").iterdir())
    reopened.delete("one")
    assert reopened.check() == CLEAN
    assert one.latents_key == two.latents_key
    reopened.close()


def test_another_process_sees_the_commit_lock(tmp_path: Path) -> None:
    """Commit sections exclude other processes on the same data dir (e.g. ``registry check --fix``)."""
    import subprocess
    import sys

    registry = LocalVoiceRegistry(tmp_path)
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "sys.exit(0 if fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is None else 1)")
    lock = str(registry.root / ".lock")
    with registry._commit:
        held = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, timeout=30)
    free = subprocess.run([sys.executable, "-c", probe, lock], capture_output=True, timeout=30)
    assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    assert free.returncode == 0, free.stderr
    registry.close()


# -- the shared cache ------------------------------------------------------------------------------------------
def test_latent_cache_is_an_lru_of_verified_latents() -> None:
    cache = LatentCache(entries=2)
    blobs = {}
    for i in range(3):
        data = encode({"x": np.full(3, i, dtype=np.float32)})
        blobs[i] = (hashlib.sha256(data).hexdigest(), data)
    with pytest.raises(CorruptBlob):
        cache.verify(blobs[0][1], blobs[1][0])
    assert len(cache) == 0
    for sha, data in blobs.values():
        cache.verify(data, sha)
    assert blobs[0][0] not in cache and blobs[1][0] in cache and blobs[2][0] in cache
    assert cache.get(blobs[1][0]) is not None  # now the most recent
    cache.verify(blobs[0][1], blobs[0][0])
    assert blobs[2][0] not in cache and blobs[1][0] in cache
    with cache.lock("k"), cache.lock("k"):  # re-entrant
        assert len(cache.locks) == 1
    assert len(cache.locks) == 0


def test_no_pickle_and_no_secrets_on_disk(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    record = create(registry, "plain", reference(490))
    data = registry.store.path(record.latents_key).read_bytes()
    assert data[:2] != b"\x80\x04" and b"__metadata__" in data[:400]
    assert os.stat(registry.root / ".lock").st_size == 0
    registry.close()
