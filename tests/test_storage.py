"""The local registry's storage under damage: a damaged or lost index, a read-only or full data directory.

A damaged index is reported naming the file and the way out (``registry rebuild``) while Piper and espeak-ng
keep speaking, and a start rebuilds it where it can; with the index lost, ``registry check --fix`` deletes no
blob a rebuild could recover; a read-only or full data dir makes a registration a 503 that leaves nothing
half-written; a DELETE that cannot remove the blob still deletes the record and says so.

Read-only and full disks are real where the tests run as root: a small tmpfs (``mount -t tmpfs``), remounted
read-only or filled up, or a read-only bind mount over one directory (root ignores file modes, so chmod would
prove nothing). Elsewhere the same failures are injected at the system calls (``OSError(EROFS / ENOSPC)``).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import (
    assert_problem,
    metric,
    register,
    running_app,
    snapshot,
    voice_audio,
    wait_for_warm_up,
    wait_until,
    wav,
)
from tests.fake_cloning_plugin import FakeCloningEngine
from tests.fake_engine import FakeEngine, FakePlugin
from tests.test_registry import MODEL, Compute, create, never, reference
from tts_gateway.cli import app as cli_app
from tts_gateway.config import Settings
from tts_gateway.errors import Unavailable
from tts_gateway.voices import LocalVoiceRegistry, RegistryUnavailable, StorageUnavailable, rebuild_index
from tts_gateway.voices.store import LatentStore, RecordFiles

REBUILD = "tts-gateway registry rebuild"


# -- helpers ---------------------------------------------------------------------------------------------------
def _run(*args: str) -> bool:
    return subprocess.run(args, capture_output=True, timeout=60).returncode == 0


def _can_mount() -> bool:
    """Root with mount(8); ``TTS_GATEWAY_TEST_SIMULATE_STORAGE=1`` forces the injected failures instead."""
    if os.environ.get("TTS_GATEWAY_TEST_SIMULATE_STORAGE") == "1":
        return False
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextmanager
def tmpfs(path: Path, size: str = "8m") -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` when this process may mount one (yields whether it did)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _can_mount() and _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield mounted
    finally:
        if mounted and not _run("umount", str(path)):
            _run("umount", "-l", str(path))


def remount(path: Path, mode: str) -> None:
    assert _run("mount", "-o", f"remount,{mode}", str(path)), f"remount,{mode} {path} failed (a file still open?)"


@contextmanager
def read_only_dir(directory: Path) -> Iterator[bool]:
    """``directory`` made read-only in place (a read-only bind mount over it) when root; yields whether it is."""
    directory.mkdir(parents=True, exist_ok=True)
    done = _can_mount() and _run("mount", "--bind", str(directory), str(directory))
    if done and not _run("mount", "-o", "remount,bind,ro", str(directory)):
        _run("umount", str(directory))
        done = False
    try:
        yield done
    finally:
        if done and not _run("umount", str(directory)):
            _run("umount", "-l", str(directory))


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill ``directory``'s file system up, leaving at most about ``leave`` bytes; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            stat = os.statvfs(directory)
            free = stat.f_bavail * stat.f_frsize
            if free <= leave:
                break
            os.write(fd, b"\0" * min(1 << 20, max(1, free - leave)))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@contextmanager
def read_only_blobs(blobs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The blob directory read-only (a bind mount when root; otherwise its writes and deletes fail with EROFS)."""
    with read_only_dir(blobs) as real:
        if not real:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr("tempfile.mkstemp", refuse)
            monkeypatch.setattr(LatentStore, "delete", refuse)
        try:
            yield
        finally:
            monkeypatch.undo()


def damage(registry_root: Path) -> Path:
    """Overwrite the index file with junk (what a torn disk or a stray ``dd`` leaves)."""
    db = registry_root / "index" / "cache.db"
    db.write_bytes(b"\x13junk that is not SQLite" * 400)
    return db


def unavailable_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("tts_gateway.voices.local_") and r.levelno >= logging.ERROR
            and "unavailable" in r.getMessage()]


def cli(data: Path, *args: str) -> Any:
    return CliRunner().invoke(cli_app, list(args), env={"TTS_GATEWAY_DATA_DIR": str(data)})


def said(result: Any) -> str:
    """The CLI's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def every_call_is_unavailable(registry: LocalVoiceRegistry, *words: str) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: registry.get("alice"), lambda: registry.exists("alice"), registry.records,
        lambda: registry.delete("alice"), lambda: create(registry, "new-one", reference(610), never),
        lambda: registry.condition(reference(620), "clone", MODEL, never), registry.check,
        lambda: registry.check(fix=True),
    ]
    for call in calls:
        with pytest.raises(RegistryUnavailable) as caught:
            call()
        assert caught.value.kind == "unavailable" and caught.value.retry_after
        for word in words:
            assert word in caught.value.detail


# -- 1. a damaged or lost index -----------------------------------------------------------------------------------
def test_a_damaged_index_is_reported_with_the_file_and_the_way_out(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    create(registry, "alice", reference(500))
    registry.close()
    db = damage(registry.root)
    before = snapshot(registry.root)

    caplog.set_level(logging.WARNING)
    damaged = LocalVoiceRegistry(tmp_path)  # does not raise
    [line] = unavailable_records(caplog)
    message = line.getMessage()
    assert str(db) in message and REBUILD in message and "\n" not in message
    reason = damaged.health()
    assert reason is not None and str(db) in reason and REBUILD in reason and "damaged" in reason
    every_call_is_unavailable(damaged, str(db), REBUILD)
    assert len(unavailable_records(caplog)) == 1  # said once, not once per call
    assert snapshot(registry.root) == before  # nothing touched, nothing "fixed"
    damaged.close()


def test_a_partly_damaged_index_is_caught_at_open_and_while_running(tmp_path: Path) -> None:
    """The index opens (its first page is fine) but pages further in are not: health names the damage and
    every read is RegistryUnavailable (a 503), never a raw sqlite3 error; also when it is damaged under a
    running registry."""
    registry = LocalVoiceRegistry(tmp_path)
    for i in range(3):
        create(registry, f"v{i}", reference(510 + i), description="x" * 3000)
    registry.close()
    db = registry.root / "index" / "cache.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 8 * 4096
    for page in range(2, len(data) // 4096):
        data[page * 4096:page * 4096 + 64] = b"\xa5" * 64  # b-tree page headers
    db.write_bytes(bytes(data))
    damaged = LocalVoiceRegistry(tmp_path)
    assert damaged.health() is not None and "damaged" in str(damaged.health())
    with pytest.raises(RegistryUnavailable, match="rebuild"):
        damaged.records()
    damaged.close()

    # Damaged under a running registry: a thread with a fresh connection (a server's worker) hits it.
    shutil.rmtree(registry.root / "index")
    rebuild_index(tmp_path)
    running = LocalVoiceRegistry(tmp_path)
    assert running.health() is None and [r.name for r in running.records()] == ["v0", "v1", "v2"]
    damage(running.root)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            running.records()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read)
    worker.start()
    worker.join(60)
    assert isinstance(outcome[0], RegistryUnavailable), outcome
    assert not isinstance(outcome[0], sqlite3.Error)
    reason = running.health()
    assert reason is not None and REBUILD in reason
    running.close()


def test_rebuild_recovers_every_name_and_verifies_every_blob(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    one = create(registry, "one", reference(520), language="en", description="first", consent=True)
    two = create(registry, "two", reference(520))  # the same clip: one blob, two names
    three = create(registry, "three", reference(530))
    bad = create(registry, "bad", reference(540))
    upload_key, upload_sha, _ = registry.condition(reference(550), "clone", MODEL, Compute())
    stray = LatentStore(registry.root / "blobs")
    junk_key = hashlib.sha256(b"junk").hexdigest()
    assert stray.write(junk_key, b"not safetensors")  # a bad blob nothing refers to
    path = registry.store.path(bad.latents_key)
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")  # bit rot
    records_before = {r.name: r.to_json() for r in registry.records()}
    assert one.latents_key == two.latents_key
    junk = damage(registry.root).read_bytes()  # the running registry's index is replaced by junk underneath it

    report = rebuild_index(tmp_path)
    assert report["voices"] == ["bad", "one", "three", "two"]
    assert report["broken"] == ["bad"]
    assert Path(report["moved_aside"], "cache.db").read_bytes() == junk  # moved aside, never deleted
    assert len(report["quarantined"]) == 2  # the rotten blob and the junk one: kept for inspection
    assert all(Path(q).exists() for q in report["quarantined"])
    assert report["upload_cache"] == 1 and report["salvaged"] == []

    fresh = LocalVoiceRegistry(tmp_path)
    for running in (registry, fresh):  # the open registry picks the new index up by itself
        assert running.health() is None
        assert {r.name: r.to_json() for r in running.records() if r.name != "bad"} == {
            k: v for k, v in records_before.items() if k != "bad"}
        running.cache.clear()
        for record in (one, two, three):
            assert set(running.latents(running.get(record.name))) == {"spectrum"}
        assert running.get("bad").status == "broken"
        assert running.condition(reference(550), "clone", MODEL, never)[:2] == (upload_key, upload_sha)
    assert fresh.check() == {"broken": ["bad"], "orphans": [], "temp_files": []}
    fresh.delete("bad")
    assert fresh.check() == {"broken": [], "orphans": [], "temp_files": []}
    registry.close()
    fresh.close()


def test_rebuild_is_deterministic_and_crash_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    for i in range(3):
        create(registry, f"d{i}", reference(560 + i))
    registry.condition(reference(570), "clone", MODEL, Compute())
    registry.close()

    def contents() -> dict[str, bytes]:
        index = LocalVoiceRegistry(tmp_path).index
        try:
            return {k: index.get(k) for k in index.iterkeys() if k != "meta:index_id"}
        finally:
            index.close()

    rebuild_index(tmp_path)
    first = contents()
    files = snapshot(registry.root / "records")
    rebuild_index(tmp_path)
    assert contents() == first  # the same files give the same index
    files_again = snapshot(registry.root / "records")
    assert {k: v for k, v in files_again.items() if k != ".index-id"} == {
        k: v for k, v in files.items() if k != ".index-id"}

    # A crash at the very end (the swap) of a rebuild of a damaged index changes nothing; running it again works.
    db = damage(registry.root)
    broken_bytes = db.read_bytes()
    real_replace = os.replace

    def crash(src: Any, dst: Any) -> None:
        if str(src).endswith("/index") or ".rebuilding-" in str(src):
            raise KeyboardInterrupt("kill -9")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rebuild_index(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert db.read_bytes() == broken_bytes
    assert LocalVoiceRegistry(tmp_path).health() is not None  # still says: rebuild
    rebuild_index(tmp_path)
    assert not list(registry.root.glob("index.rebuilding-*"))
    assert contents() == first


def test_record_files_mirror_the_index_and_old_data_dirs_get_them(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    record = create(registry, "mirror", reference(580))
    files = RecordFiles(registry.root / "records")
    assert files.read("mirror") == record.to_json() == registry.index.get("voice:mirror")
    assert files.read_id() == registry.index.get("meta:index_id").decode()
    # A file the index lacks (a crash between a record file and its index entry): reported, removed by
    # check --fix; an indexed voice's missing file: written again at the next open.
    files.write("ghost", create(LocalVoiceRegistry(tmp_path / "other"), "ghost", reference(590)).to_json())
    (files.root / "mirror.json").unlink()
    registry.close()
    reopened = LocalVoiceRegistry(tmp_path)
    assert files.read("mirror") == record.to_json()
    assert reopened.check() == {"broken": [], "orphans": ["record:ghost"], "temp_files": []}
    reopened.check(fix=True)
    assert files.names() == ["mirror"] and reopened.check() == {"broken": [], "orphans": [], "temp_files": []}
    # A data directory from before record files: no files, no id in the index. They are written at open.
    reopened.index.delete("meta:index_id")
    reopened.close()
    shutil.rmtree(files.root)
    upgraded = LocalVoiceRegistry(tmp_path)
    assert upgraded.health() is None
    assert files.names() == ["mirror"] and files.read_id() == upgraded.index.get("meta:index_id").decode()
    upgraded.close()


def test_rebuild_salvages_names_the_record_files_lack(tmp_path: Path) -> None:
    """An old data dir whose index broke before it ever got record files: readable rows are recovered."""
    registry = LocalVoiceRegistry(tmp_path)
    kept = create(registry, "kept", reference(600))
    registry.close()
    shutil.rmtree(registry.root / "records")
    report = rebuild_index(tmp_path)
    assert report["salvaged"] == ["kept"] and report["voices"] == ["kept"]
    reopened = LocalVoiceRegistry(tmp_path)
    assert reopened.get("kept") == kept
    assert RecordFiles(registry.root / "records").read("kept") == kept.to_json()
    reopened.close()


def test_check_fix_never_deletes_what_a_rebuild_could_recover(tmp_path: Path) -> None:
    registry = LocalVoiceRegistry(tmp_path)
    names = [create(registry, f"keep{i}", reference(630 + i)).name for i in range(3)]
    registry.close()
    blobs = snapshot(registry.root / "blobs")

    # The index is lost (deleted, or its disk replaced): nothing is deleted; the way out is named.
    shutil.rmtree(registry.root / "index")
    lost = LocalVoiceRegistry(tmp_path)
    reason = lost.health()
    assert reason is not None and "missing" in reason and REBUILD in reason
    with pytest.raises(RegistryUnavailable, match="registry rebuild"):
        lost.check(fix=True)
    result = cli(tmp_path, "registry", "check", "--fix")
    assert result.exit_code == 2 and REBUILD in said(result)
    assert snapshot(registry.root / "blobs") == blobs
    assert not (registry.root / "index" / "cache.db").exists()  # no empty index was made in its place
    lost.close()

    # An index that opens but lists nothing while blobs are stored: reported, nothing deleted.
    rebuild_index(tmp_path)
    emptied = LocalVoiceRegistry(tmp_path)
    for key in list(emptied.index.iterkeys()):
        if key != "meta:index_id":
            emptied.index.delete(key)
    report = emptied.check(fix=True)
    assert report["rebuild_needed"] and REBUILD in report["rebuild_needed"][0]
    assert report["orphans"] == [f"record:{name}" for name in names]  # their blobs are not orphans
    assert snapshot(registry.root / "blobs") == blobs
    emptied.close()
    result = cli(tmp_path, "registry", "check", "--fix")
    assert result.exit_code == 1 and REBUILD in said(result)
    assert snapshot(registry.root / "blobs") == blobs

    result = cli(tmp_path, "registry", "rebuild")
    assert result.exit_code == 0, result.output
    recovered = LocalVoiceRegistry(tmp_path)
    assert [r.name for r in recovered.records()] == names
    assert recovered.check() == {"broken": [], "orphans": [], "temp_files": []}
    recovered.close()


class Stderr:
    """What the app has written to stderr so far. Its log handler (Litestar's logging config) writes from a
    queue-listener thread, so a line logged during start-up reaches stderr some time later, later still on a
    loaded machine: wait for the line, never read once and assume it is there."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.text = ""

    def lines(self) -> list[str]:
        self.text += self.capfd.readouterr().err
        return self.text.splitlines()

    def wait_for(self, *words: str) -> str:
        """The first line holding every one of ``words``, once it has been written."""
        found: list[str] = []

        def written() -> bool:
            found[:] = [line for line in self.lines() if all(word in line for word in words)]
            return bool(found)

        wait_until(written, f"a log line with {words}")
        return found[0]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def records_of(name: str) -> Iterator[list[logging.LogRecord]]:
    """Every record logger ``name`` emits, as it emits it: a handler on that logger itself is synchronous and
    stays put when an app's logging config replaces the root logger's handlers (and caplog's with them)."""
    handler = _Collect()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


DAMAGES: dict[str, Callable[[Path], Any]] = {
    "overwritten": lambda db: damage(db.parent.parent),
    "truncated": lambda db: db.write_bytes(db.read_bytes()[:db.stat().st_size // 2]),
    "emptied": lambda db: db.write_bytes(b""),
}


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_the_gateway_rebuilds_a_damaged_index_at_start_and_its_presets_speak(
        how: str, make_settings: Callable[..., Settings], capfd: pytest.CaptureFixture[str]) -> None:
    """The index is derived from the record files and verified blobs: a start rebuilds it by itself (the
    damaged file moved aside, what was recovered logged), and the presets are listed and speak with their
    stored latents, none computed again."""
    settings = make_settings()  # piper, espeak; default voice piper:joe
    speech = {"text": "Still here after a rebuild.", "seed": 1, "cache": False}  # no phrase cache: the latents speak
    with running_app(settings, FakePlugin(FakeCloningEngine())) as client:
        shas = {}
        for name, pitch in (("alice", 240), ("bob", 250)):
            created = register(client, name, wav(voice_audio(pitch=pitch)), engine="clone")
            assert created.status_code == 201, created.text
            shas[name] = created.json()["voice_sha256"]
        before = client.post("/v1/synthesize", json={**speech, "voice": "alice"})
        assert before.status_code == 200, before.text
    db = settings.data_dir / "voices" / "index" / "cache.db"
    DAMAGES[how](db)
    damaged = db.read_bytes()
    log = Stderr(capfd)

    with records_of("tts_gateway.voices") as logged, \
            running_app(settings, FakePlugin(FakeCloningEngine())) as client:
        listed = client.get("/v1/voices")  # at once: the start itself repaired the index
        assert listed.status_code == 200, listed.text
        presets = {v["name"]: v for v in listed.json()["voices"] if v["kind"] == "preset"}
        assert {name: (v["voice_sha256"], v["status"]) for name, v in presets.items()} == {
            name: (sha, "ok") for name, sha in shas.items()}
        assert any(v["name"] == "piper:joe" for v in listed.json()["voices"])
        spoken = client.post("/v1/synthesize", json={**speech, "voice": "alice"})
        assert spoken.status_code == 200, spoken.text
        assert spoken.headers["x-voice-sha256"] == shas["alice"] and spoken.content == before.content
        assert metric(client, "tts_conditioning_computations_total", engine="clone") == 0  # stored latents, verified

        [aside] = (settings.data_dir / "voices").glob("index.damaged-*")
        assert (aside / "cache.db").read_bytes() == damaged  # moved aside for inspection, never deleted
        log.wait_for(str(db), "rebuilding it from the record files")  # what was wrong
        recovered = log.wait_for("rebuilt", "2 preset(s) recovered (alice, bob)")  # and what came back
        assert str(aside) in recovered
        wait_for_warm_up(client)
        ready = client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert [r.getMessage() for r in logged if r.levelno >= logging.ERROR] == []  # repaired, not reported


def test_a_registry_that_cannot_be_rebuilt_makes_the_listing_a_503(
        make_settings: Callable[..., Settings], capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged index on a read-only disk cannot be rebuilt at start. Listing the voices answers 503 naming
    the file and the cause (a 200 without the presets would read as if they had been deleted); built-in voices
    speak; /ready says what is wrong. Once the disk is writable, the rebuild command brings the presets back
    with no restart."""
    settings = make_settings()
    with running_app(settings, FakePlugin(FakeCloningEngine())) as client:
        assert register(client, "alice", wav(voice_audio(pitch=240)), engine="clone").status_code == 201
    voices = settings.data_dir / "voices"
    db = damage(voices)
    before = snapshot(voices)
    log = Stderr(capfd)
    read_only = ExitStack()
    try:
        if not read_only.enter_context(read_only_dir(voices)):
            real_makedirs = os.makedirs

            def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
                if str(path).startswith(str(voices)):
                    raise OSError(errno.EROFS, "Read-only file system")
                real_makedirs(path, *args, **kwargs)

            monkeypatch.setattr(os, "makedirs", refuse)
        with running_app(settings, FakePlugin(FakeCloningEngine())) as client:
            for path in ("/v1/voices", "/v1/audio/voices"):
                listing = client.get(path)
                body = assert_problem(listing, 503, "rebuild", "read-only")
                assert str(db) in body["detail"] and listing.headers["retry-after"]
            for response in (client.get("/v1/voices/alice"),
                             client.post("/v1/synthesize", json={"text": "hi", "voice": "alice"})):
                assert str(db) in assert_problem(response, 503, "rebuild")["detail"]
            assert client.get("/v1/voices/piper:joe").status_code == 200
            for voice in ("piper:joe", "espeak:en"):
                spoken = client.post("/v1/synthesize", json={"text": "Still speaking.", "voice": voice})
                assert spoken.status_code == 200, spoken.text
            wait_for_warm_up(client)
            assert str(db) in assert_problem(client.get("/ready"), 503, "rebuild")["detail"]
            log.wait_for("voice registry unavailable", str(db), "rebuilding it at start failed", "read-only")
            result = cli(settings.data_dir, "voices", "list")  # the CLI's listing says so too
            assert result.exit_code == 1 and str(db) in said(result), result.output
            assert snapshot(voices) == before

            read_only.close()  # the disk is writable again
            monkeypatch.undo()
            result = cli(settings.data_dir, "registry", "rebuild")
            assert result.exit_code == 0, result.output
            listed = client.get("/v1/voices")
            assert listed.status_code == 200, listed.text
            assert [v["name"] for v in listed.json()["voices"] if v["kind"] == "preset"] == ["alice"]
            assert client.post("/v1/synthesize", json={"text": "hi", "voice": "alice"}).status_code == 200
            assert client.get("/ready").status_code == 200
    finally:
        read_only.close()


# -- 2. a read-only or full data directory --------------------------------------------------------------------------
@pytest.fixture
def data_on_tmpfs(tmp_path: Path) -> Iterator[tuple[Path, bool]]:
    with tmpfs(tmp_path / "fs") as real:
        yield tmp_path / "fs" / "data", real


def test_a_read_only_data_dir_is_503_and_nothing_changes(data_on_tmpfs: tuple[Path, bool],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data, real = data_on_tmpfs
    registry = LocalVoiceRegistry(data)
    create(registry, "alice", reference(640))
    registry.close()
    before = snapshot(data)
    if real:
        remount(data.parent, "ro")
    else:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(os, "replace", refuse)
        monkeypatch.setattr(os, "link", refuse)
        monkeypatch.setattr("tempfile.mkstemp", refuse)
        monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: (_ for _ in ()).throw(
            sqlite3.OperationalError("attempt to write a readonly database")))
        monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 1, 0, 0, 1, 0, 0,
                                                                        os.ST_RDONLY, 255)))
    readonly = LocalVoiceRegistry(data)
    compute = Compute()
    for attempt in (lambda: create(readonly, "bob", reference(650), compute), lambda: readonly.delete("alice")):
        with pytest.raises(StorageUnavailable) as caught:
            attempt()
        assert "is not writable: read-only file system" in caught.value.detail
        assert str(data) in caught.value.detail and caught.value.kind == "unavailable"
    assert compute.calls == 0
    readonly.close()
    if real:
        remount(data.parent, "rw")
    monkeypatch.undo()
    assert snapshot(data) == before
    again = LocalVoiceRegistry(data)
    assert again.health() is None and [r.name for r in again.records()] == ["alice"]
    create(again, "bob", reference(650))  # writable again: works
    again.close()


def test_a_read_only_blob_dir_under_a_running_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The blob directory turns read-only while the registry runs: a registration is a 503 that leaves
    nothing; a delete still deletes (its acknowledgement is the record) and says the blob stayed; a second
    delete is a 404."""
    registry = LocalVoiceRegistry(tmp_path)
    doomed = create(registry, "doomed", reference(660))
    stays = create(registry, "stays", reference(665))
    with read_only_blobs(registry.root / "blobs", monkeypatch):
        records_before = snapshot(registry.root / "records")
        with pytest.raises(StorageUnavailable, match="is not writable: read-only file system"):
            create(registry, "newcomer", reference(670))
        assert not registry.exists("newcomer") and snapshot(registry.root / "records") == records_before
        caplog.set_level(logging.WARNING)
        assert registry.delete("doomed") == doomed
        assert any("doomed deleted" in r.getMessage() and "not removed" in r.getMessage() for r in caplog.records)
        assert not registry.exists("doomed") and RecordFiles(registry.root / "records").read("doomed") is None
        from tts_gateway.voices import VoiceNotFound

        with pytest.raises(VoiceNotFound):
            registry.delete("doomed")
    assert registry.check() == {"broken": [], "orphans": [doomed.latents_key], "temp_files": []}
    registry.check(fix=True)
    assert registry.check() == {"broken": [], "orphans": [], "temp_files": []}
    registry.cache.clear()
    assert set(registry.latents(stays)) == {"spectrum"}
    registry.close()


def test_a_full_data_dir_is_503_and_nothing_is_half_written(data_on_tmpfs: tuple[Path, bool],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data, real = data_on_tmpfs
    registry = LocalVoiceRegistry(data)
    alice = create(registry, "alice", reference(680))
    clean = {"broken": [], "orphans": [], "temp_files": []}

    def big(samples: np.ndarray) -> dict[str, np.ndarray]:  # a blob bigger than the space left
        return {"spectrum": np.ones(600_000 // 4, dtype=np.float32)}

    # Completely full: refused before the latents are computed.
    if real:
        filler = fill(data.parent)
    else:
        monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    compute = Compute()
    with pytest.raises(StorageUnavailable, match="is full: no space left on device") as caught:
        create(registry, "bob", reference(690), compute)
    assert str(data) in caught.value.detail and caught.value.code == "storage-full"
    assert compute.calls == 0
    if real:
        with pytest.raises(StorageUnavailable, match="is full"):
            registry.delete("alice")  # the index cannot record it: nothing changes
        assert registry.get("alice") == alice
        assert RecordFiles(registry.root / "records").read("alice") == alice.to_json()
        filler.unlink()
    monkeypatch.undo()

    # Nearly full: the blob does not fit; the attempt leaves no temp file, no blob, no record.
    if real:
        filler = fill(data.parent, leave=200_000)
    else:  # the write-back of the temp file fails, as on a full disk
        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    before = snapshot(registry.root / "blobs")
    with pytest.raises(StorageUnavailable, match="is full: no space left on device"):
        create(registry, "carol", reference(700), big)
    monkeypatch.undo()
    assert not registry.exists("carol") and RecordFiles(registry.root / "records").read("carol") is None
    assert snapshot(registry.root / "blobs") == before
    assert registry.check() == clean

    # The upload cache is a cache: a disk that cannot take the blob costs the caching, not the request.
    if not real:
        monkeypatch.setattr(os, "fsync", full)
    key, _sha, latents = registry.condition(reference(710), "clone", MODEL, big)
    monkeypatch.undo()
    assert latents["spectrum"].shape == (150_000,)
    assert registry.check() == clean and not registry.store.exists(key)
    if real:
        filler.unlink()
    assert create(registry, "carol", reference(700), big).status == "ok"  # room again: it works
    registry.cache.clear()
    assert set(registry.latents(alice)) == {"spectrum"}
    assert registry.check() == clean
    registry.close()


def test_a_failed_record_write_or_index_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last two steps of a registration failing on a full disk: no record file, no index entry."""
    registry = LocalVoiceRegistry(tmp_path)
    clean = {"broken": [], "orphans": [], "temp_files": []}

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordFiles, "write", full)
    with pytest.raises(StorageUnavailable, match="is full"):
        create(registry, "first", reference(720))
    monkeypatch.undo()
    assert not registry.exists("first") and RecordFiles(registry.root / "records").names() == []
    assert registry.check() == clean  # the blob stays only as an upload-cache entry (bounded)

    index = registry.index
    monkeypatch.setattr(type(index), "add", lambda *a, **k: (_ for _ in ()).throw(
        sqlite3.OperationalError("database or disk is full")))
    with pytest.raises(StorageUnavailable, match="is full"):
        create(registry, "second", reference(730))
    monkeypatch.undo()
    assert not registry.exists("second") and RecordFiles(registry.root / "records").names() == []
    assert registry.check() == clean

    created = create(registry, "second", reference(730))
    monkeypatch.setattr(type(index), "delete", lambda *a, **k: (_ for _ in ()).throw(
        sqlite3.OperationalError("database or disk is full")))
    with pytest.raises(StorageUnavailable, match="is full"):
        registry.delete("second")
    monkeypatch.undo()
    assert registry.get("second") == created  # nothing changed, the record file is back
    assert RecordFiles(registry.root / "records").read("second") == created.to_json()
    assert registry.check() == clean
    registry.close()


def test_http_storage_failures_are_503_and_delete_is_idempotent(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path / "data", engines=(), default_voice="fake:one", max_concurrency=2,
                        timeout_s=60, canary=False)
    with running_app(settings, FakePlugin(FakeEngine()), FakePlugin(FakeCloningEngine())) as client:
        assert register(client, "one", wav(voice_audio(pitch=300)), engine="clone").status_code == 201
        assert register(client, "two", wav(voice_audio(pitch=310)), engine="clone").status_code == 201
        with read_only_blobs(settings.data_dir / "voices" / "blobs", monkeypatch):
            refused = register(client, "three", wav(voice_audio(pitch=320)), engine="clone")
            body = assert_problem(refused, 503, "is not writable: read-only file system")
            assert str(settings.data_dir) in body["detail"]
            assert client.delete("/v1/voices/one").status_code == 204  # the record went; the blob could not
            assert_problem(client.delete("/v1/voices/one"), 404)
        assert client.get("/v1/voices/one").status_code == 404
        assert client.get("/v1/voices/two").status_code == 200
        assert client.post("/v1/synthesize", json={"text": "hi", "voice": "two"}).status_code == 200


def test_storage_errors_are_unavailable_kind() -> None:
    assert issubclass(StorageUnavailable, RegistryUnavailable)
    assert issubclass(RegistryUnavailable, Unavailable)
