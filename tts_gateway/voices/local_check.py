"""Checking the local registry and setting aside what failed: broken presets, bad blobs, orphans, temp files.

A blob that fails verification is quarantined (moved to ``voices/quarantine``, never deleted) unless its bytes
still verify for another preset or the upload cache; a preset whose blob failed is marked broken (409 on use)
so that it can be deleted and registered again. ``check`` never removes what a rebuild of the index could
still recover (`tts_gateway.voices.local_rebuild`).
"""

from __future__ import annotations

import logging
from functools import partial

from tts_gateway.voices.blobs import problem, sha256_hex
from tts_gateway.voices.cache import LatentCache
from tts_gateway.voices.local_index import (
    REBUILD_COMMAND,
    STORAGE_ERRORS,
    LocalIndex,
    blob_users,
    drop_pointer,
    index_records,
    pointer,
    pointer_entries,
)
from tts_gateway.voices.local_rebuild import record_file
from tts_gateway.voices.registry import RegistryUnavailable, VoiceRecord
from tts_gateway.voices.store import LatentStore, RecordFiles

log = logging.getLogger(__name__)


class LocalCheck:
    """Check and quarantine for the registry whose index, blobs, record files and memory cache these are."""

    def __init__(self, index: LocalIndex, store: LatentStore, record_files: RecordFiles, cache: LatentCache) -> None:
        self.index = index
        self.store = store
        self.record_files = record_files
        self.cache = cache

    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs and record files, and leftover temp files; ``fix`` marks the
        broken voices and removes the rest (a blob another voice still uses is never removed).

        When the index lists nothing while blobs are stored, the report holds ``"rebuild_needed"`` and no blob
        is removed: a rebuild of the index (``tts-gateway registry rebuild``) may still recover them.
        """
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        broken: list[tuple[VoiceRecord, str]] = []
        with self.index.guard(), self.index.locked() as index:  # a consistent picture: no write is half done
            records = index_records(index)
            for record in records:
                detail = ("marked broken" if record.status == "broken"
                          else problem(self.store.read(record.latents_key), record.latents_sha256))
                if detail is not None:
                    report["broken"].append(record.name)
                    broken.append((record, detail))
            pointers = pointer_entries(index)
            stale = [name for name in self.record_files.names() if f"voice:{name}" not in index]
            # A blob a record file names is never an orphan: a rebuild would recover its preset.
            filed = {r.latents_key for r in map(partial(record_file, self.record_files), stale) if r}
            referenced = {r.latents_key for r in records} | set(pointers) | filed
            blobs = self.store.keys()
            orphans = [key for key in blobs if key not in referenced]
            report["orphans"] = orphans + [f"record:{name}" for name in stale]
            temp_files = self.store.temp_files() + self.record_files.temp_files()
            report["temp_files"] = [str(tmp) for tmp in temp_files]
            rebuild_needed = not records and not pointers and bool(blobs or stale)
            if rebuild_needed:
                report["rebuild_needed"] = [
                    f"the voice index {self.index.db} lists no voice but {len(blobs)} latent blob(s) and "
                    f"{len(stale)} record file(s) are stored; nothing was deleted — run `{REBUILD_COMMAND}` to "
                    "recover them"]
                orphans = []
            if fix:
                for tmp in temp_files:  # nobody writes while the commit lock is held
                    tmp.unlink(missing_ok=True)
                self.index.sync_record_files(index, remove_stale=not rebuild_needed)
        if fix:
            for record, detail in broken:
                if record.status != "broken":
                    self.mark_broken(record, detail)
                with self.index.guard():
                    self.quarantine_unless_used(record.latents_key)
            for key in orphans:
                with self.index.guard():
                    self._drop_orphan(key)
        return report

    def quarantine_unless_used(self, key: str, seen: bytes | None = None) -> None:
        """Move blob ``key`` aside unless its bytes verify for a record or the upload cache (best effort on
        a disk that cannot be written: the caller's error stands, and the blob is tried again next time)."""
        try:
            with self.cache.lock(key), self.index.locked() as index:
                data = self.store.read(key)
                if data is None or (seen is not None and data != seen):
                    return  # gone, or replaced since the caller looked
                sha = sha256_hex(data)
                if sha in blob_users(index, key) and problem(data, sha) is None:
                    return  # another voice's good blob: the caller's sha256 is the stale one
                self.cache.forget(sha)
                self.store.quarantine(key, seen=data)
                drop_pointer(index, key, sha)
        except STORAGE_ERRORS as exc:
            log.warning("latent blob %s not quarantined: %s", key[:12], exc)

    def mark_broken(self, record: VoiceRecord, detail: str) -> None:
        """Best effort: a read that found bad latents answers `VoiceBroken` whether or not this is stored."""
        self.cache.forget(record.latents_sha256)
        try:
            with self.index.locked() as index:
                current = index.get(f"voice:{record.name}")
                if isinstance(current, bytes):
                    fresh = VoiceRecord.from_json(current)
                    if fresh.latents_sha256 == record.latents_sha256 and fresh.status != "broken":
                        fresh.status = "broken"
                        fresh.extra["broken_reason"] = detail
                        data = fresh.to_json()
                        self.record_files.write(record.name, data)
                        index.set(f"voice:{record.name}", data)
        except (*STORAGE_ERRORS, RegistryUnavailable) as exc:
            log.warning("voice %s not marked broken: %s", record.name, exc)
        log.error("voice %s marked broken: %s", record.name, detail)

    def _drop_orphan(self, key: str) -> None:
        with self.cache.lock(key), self.index.locked() as index:
            if pointer(index, key) is not None or any(r.latents_key == key for r in index_records(index)):
                return  # used again since check looked
            sha = self.store.sha256_of(key)
            if sha is not None:
                self.cache.forget(sha)
            self.store.delete(key)
