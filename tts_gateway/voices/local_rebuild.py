"""Rebuilding the local registry's index from what is on disk: the record files and the verified blobs.

`rebuild_index` is ``tts-gateway registry rebuild``; a `LocalVoiceRegistry` opened with ``rebuild_damaged``
(the gateway's start) runs `rebuild_locked` under its own commit lock when it finds its index damaged,
missing or replaced. The index is derived data: the record files (``records/<name>.json``, written before
the index entry that acknowledges a preset) and the blobs (named by their origin, verified by sha256) hold
everything it does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tts_gateway.voices.blobs import problem, read_metadata, sha256_hex
from tts_gateway.voices.local_index import INDEX_DB, INDEX_ID, CommitLock, index_cache
from tts_gateway.voices.names import valid_voice_name
from tts_gateway.voices.registry import VoiceRecord, latents_key
from tts_gateway.voices.store import LatentStore, RecordFiles, fsync_dir

log = logging.getLogger(__name__)


def rebuild_index(data_dir: Path) -> dict[str, Any]:
    """Rebuild ``<data_dir>/voices/index`` from what is on disk; the old index (if any) is moved aside.

    Presets come from the record files (``voices/records/<name>.json``) and, for names without one (data from
    before record files), from whatever rows of the old index can still be read. Every blob is verified
    (sha256, safetensors, its metadata against its key): an intact blob becomes an upload-cache entry, a bad
    one is quarantined (never deleted); a preset whose blob is missing or does not match its record is kept,
    marked broken, so that it is listed and can be deleted and registered again.

    Crash-safe: the new index is built beside the old one and swapped in by renames at the end, under the
    commit lock; a crash before the swap changes nothing that matters, and the command can simply be run again.
    Deterministic: the same files give the same index (records byte for byte; upload-cache recency from the
    blobs' modification times).

    Returns a report: ``index``, ``moved_aside``, ``voices``, ``broken``, ``salvaged`` (names found only in the
    old index), ``blobs`` (intact), ``upload_cache`` (intact blobs no preset uses), ``quarantined``,
    ``unreadable_records``, ``temp_files``.
    """
    root = data_dir / "voices"
    root.mkdir(parents=True, exist_ok=True)
    return rebuild_locked(data_dir, CommitLock(root / ".lock"))


def rebuild_locked(data_dir: Path, lock: CommitLock) -> dict[str, Any]:
    """`rebuild_index` under ``lock`` (a registry rebuilding at start passes its own: flock is per open file,
    so a second lock on the same file in this process would wait for the first forever)."""
    root = data_dir / "voices"
    index_dir = root / "index"
    store = LatentStore(root / "blobs")
    files = RecordFiles(root / "records")
    report: dict[str, Any] = {"index": str(index_dir), "moved_aside": None, "voices": [], "broken": [],
                              "salvaged": [], "blobs": 0, "upload_cache": 0, "quarantined": [],
                              "unreadable_records": [], "temp_files": []}
    with lock:
        for leftover in sorted(root.glob("index.rebuilding-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        for tmp in store.temp_files() + files.temp_files():
            report["temp_files"].append(str(tmp))
            tmp.unlink(missing_ok=True)

        # 1. Presets: record files first; the old index's readable rows for names that have none.
        records: dict[str, VoiceRecord] = {}
        for name in files.names():
            record = record_file(files, name)
            if record is None:
                report["unreadable_records"].append(name)
                _quarantine_file(files.path(name), store.quarantine_dir / "records")
                continue
            records[name] = record
        for name, record in _salvage(index_dir / INDEX_DB):
            if name not in records:
                records[name] = record
                report["salvaged"].append(name)

        # 2. Blobs: verify every one; intact ones are upload-cache entries, bad ones go to quarantine.
        pointers: dict[str, tuple[str, float]] = {}
        for key in store.keys():
            data = store.read(key)
            if data is None:
                continue
            sha = sha256_hex(data)
            meta = read_metadata(data)
            fault = problem(data, sha)
            if fault is None and all(k in meta for k in ("audio_sha256", "engine", "model_sha256")) and \
                    latents_key(meta["audio_sha256"], meta["engine"], meta["model_sha256"]) != key:
                fault = "its metadata names another origin than its key"
            if fault is not None:
                target = store.quarantine(key, seen=data)
                if target is not None:
                    report["quarantined"].append(str(target))
                continue
            pointers[key] = (sha, store.mtime_ns(key) / 1e9)

        # 3. Each preset against its blob.
        for name in sorted(records):
            record = records[name]
            entry = pointers.get(record.latents_key)
            if entry is None or entry[0] != record.latents_sha256:
                fault = "blob is missing" if entry is None else "blob does not match its recorded sha256"
                if record.status != "broken":
                    record.status = "broken"
                    record.extra["broken_reason"] = f"found by a rebuild of the index: {fault}"
            if record.status == "broken":
                report["broken"].append(name)
            report["voices"].append(name)
        # A blob that verifies as a file but is not what any of its presets recorded has changed on disk
        # (bit rot): it is quarantined like any blob a read finds bad, not kept as an upload-cache entry.
        wanted: dict[str, set[str]] = {}
        for record in records.values():
            wanted.setdefault(record.latents_key, set()).add(record.latents_sha256)
        for key, shas in sorted(wanted.items()):
            entry = pointers.get(key)
            if entry is not None and entry[0] not in shas:
                target = store.quarantine(key)
                if target is not None:
                    report["quarantined"].append(str(target))
                del pointers[key]
        report["blobs"] = len(pointers)
        report["upload_cache"] = len(set(pointers) - {r.latents_key for r in records.values()})

        # 4. The new index beside the old one, then the record files and the id, then the swap.
        index_id = uuid.uuid4().hex
        building = root / f"index.rebuilding-{os.getpid()}-{time.time_ns()}"
        new = index_cache(building)
        try:
            new.set(INDEX_ID, index_id.encode())
            for name in sorted(records):
                new.set(f"voice:{name}", records[name].to_json())
            for key, (sha, used) in sorted(pointers.items()):
                new.set(f"audio:{key}", json.dumps({"latents_sha256": sha, "used": used}, sort_keys=True).encode())
        finally:
            new.close()
        for name in sorted(records):
            data = records[name].to_json()
            if files.read(name) != data:
                files.write(name, data)
        files.write_id(index_id)
        if index_dir.exists():
            aside = root / f"index.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{time.time_ns() % 10**6}"
            os.replace(index_dir, aside)
            report["moved_aside"] = str(aside)
        os.replace(building, index_dir)
        fsync_dir(root)
    log.warning("%s", _rebuild_summary(report))
    return report


def _rebuild_summary(report: dict[str, Any]) -> str:
    """One line saying what a rebuild recovered (for the log): the presets by name, the broken ones, the rest."""
    def names(found: list[str]) -> str:
        shown = ", ".join(found[:20])
        return f" ({shown}{', …' if len(found) > 20 else ''})" if found else ""

    broken = report["broken"]
    intact = [name for name in report["voices"] if name not in broken]
    parts = [f"{len(intact)} preset(s) recovered{names(intact)}"]
    if broken:
        parts.append(f"{len(broken)} broken{names(broken)} (delete and register them again)")
    parts.append(f"{report['upload_cache']} upload-cache entries, {len(report['quarantined'])} blob(s) quarantined")
    aside = report["moved_aside"]
    return (f"voice index {report['index']} rebuilt from the record files and latent blobs: {', '.join(parts)}; "
            + (f"the old index was moved to {aside}" if aside else "there was no old index"))


def record_file(files: RecordFiles, name: str) -> VoiceRecord | None:
    """The record in preset ``name``'s file, or None when it is missing, unreadable or names another preset."""
    data = files.read(name)
    if data is None:
        return None
    try:
        record = VoiceRecord.from_json(data)
    except (ValueError, TypeError):
        return None
    if record.name != name or not isinstance(record.latents_key, str) or len(record.latents_key) != 64:
        return None
    return record


def _salvage(db: Path) -> Iterator[tuple[str, VoiceRecord]]:
    """Presets still readable in a (possibly damaged) old index; reading stops at the first damaged page."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return
    try:
        rows = con.execute("SELECT key, value FROM Cache WHERE key LIKE 'voice:%'")
        while True:
            try:
                row = rows.fetchone()
            except sqlite3.Error:
                break
            if row is None:
                break
            key, value = row
            if not isinstance(key, str) or not isinstance(value, bytes):
                continue
            name = key.removeprefix("voice:")
            try:
                record = VoiceRecord.from_json(value)
            except (ValueError, TypeError):
                continue
            if record.name == name and valid_voice_name(name):
                yield name, record
    except sqlite3.Error:
        return
    finally:
        con.close()


def _quarantine_file(path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.replace(path, directory / f"{path.name}.{time.time_ns()}")
