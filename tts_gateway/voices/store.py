"""Files of the registry: latent blobs (written once, atomically, never over an existing file), the per-preset
record files a rebuild of the index reads, and what a storage failure means to a client.

The store knows files, not voices: which blob is still in use, and so may or may not be quarantined or
deleted, is the registry's decision.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import tempfile
import time
from pathlib import Path

from tts_gateway.voices.blobs import CorruptBlob, sha256_hex
from tts_gateway.voices.names import valid_voice_name
from tts_gateway.voices.registry import RegistryUnavailable

log = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
# A file system without hard links answers link() with one of these; anything else is a real failure.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

__all__ = ["CorruptBlob", "LatentStore", "RecordFiles", "StorageUnavailable", "atomic_write", "fsync_dir",
           "storage_error"]


class StorageUnavailable(RegistryUnavailable):
    """The registry's storage cannot be written (read-only, full, failing) or is busy: HTTP 503."""


def _directory_state(directory: Path) -> str | None:
    """"read-only" / "denied" when ``directory`` (or its nearest existing parent) cannot be written, else None."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return "read-only"
    except OSError:
        return None
    return None if os.access(probe, os.W_OK) else "denied"


def storage_error(exc: BaseException, data_dir: Path) -> StorageUnavailable | None:
    """What a failed file or SQLite operation under ``data_dir`` means to a client, or None when ``exc`` is not
    a storage failure (a damaged index, say: the caller decides about those)."""
    where = f"the data directory {data_dir}"
    kind: str | None = None
    if isinstance(exc, OSError):
        code = exc.errno
        if code == errno.EROFS:
            kind = "read-only"
        elif code in (errno.ENOSPC, errno.EDQUOT):
            kind = "full" if code == errno.ENOSPC else "quota"
        elif code in (errno.EACCES, errno.EPERM):
            kind = "denied"
        else:
            reason = exc.strerror or type(exc).__name__
            return StorageUnavailable(f"{where} cannot be used: {reason.lower()}", code="storage-error")
    elif isinstance(exc, sqlite3.OperationalError):
        name = getattr(exc, "sqlite_errorname", "")
        text = str(exc).lower()
        if name.startswith("SQLITE_FULL") or "disk is full" in text:
            kind = "full"
        elif name.startswith("SQLITE_READONLY") or "readonly" in text:
            kind = _directory_state(data_dir) or "read-only"
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return StorageUnavailable("the voice index is busy (another process holds it); try again",
                                      code="registry-busy", retry_after=1)
        elif name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
            kind = _directory_state(data_dir)
            if kind is None:
                return StorageUnavailable(f"{where} cannot be used: the voice index cannot be opened ({text})",
                                          code="storage-error")
        elif name.startswith("SQLITE_IOERR") or "i/o error" in text:
            return StorageUnavailable(f"{where} cannot be used: input/output error", code="storage-error")
        else:
            return None
    else:
        return None
    detail = {
        "read-only": f"{where} is not writable: read-only file system",
        "denied": f"{where} is not writable: permission denied",
        "full": f"{where} is full: no space left on device",
        "quota": f"{where} is full: disk quota exceeded",
    }[kind]
    return StorageUnavailable(detail, code="storage-full" if kind in ("full", "quota") else "storage-read-only")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_copy(path: Path, data: bytes) -> str:
    """``data`` durably in a temp file beside ``path``; returns its name. Nothing is left behind on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, data: bytes) -> None:
    """temp file → fsync → rename → fsync dir: a crash leaves the old file or the new, never half."""
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes) -> bool:
    """Like `atomic_write`, but never replaces an existing file: False (and nothing written) if one exists."""
    tmp = _temp_copy(path, data)
    try:
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # A file system without hard links: the caller's lock keeps writers apart.
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


class LatentStore:
    """Blobs named by a 64-hex key under ``root/<k[:2]>/<key>.safetensors``; bad ones go to ``../quarantine``.

    Directories are made on first write, so opening a store on a read-only disk does not fail.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.quarantine_dir = root.parent / "quarantine"

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"bad blob key {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> bool:
        """Store ``data`` as ``key`` unless a file is already there (it is never overwritten)."""
        return atomic_create(self.path(key), data)

    def sha256_of(self, key: str) -> str | None:
        data = self.read(key)
        return None if data is None else sha256_hex(data)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*/*.safetensors") if _KEY_RE.match(p.stem))

    def mtime_ns(self, key: str) -> int:
        try:
            return self.path(key).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob("*/.tmp-*"))

    def quarantine(self, key: str, seen: bytes | None = None) -> Path | None:
        """Move the file aside (kept for inspection, never served); only if it still holds ``seen`` when given.

        Returns where it went, or None when there was nothing (or something else) to move.
        """
        path = self.path(key)
        if seen is not None and self.read(key) != seen:
            return None
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{key}.{time.time_ns()}.safetensors"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        log.warning("quarantined latent blob %s to %s", key, target)
        return target


class RecordFiles:
    """One file per preset, ``root/<name>.json``, holding exactly the bytes of its record in the index
    (`VoiceRecord.to_json`: sorted keys, so the same record always gives the same bytes), written atomically.

    They are what a rebuild of a damaged or lost index recovers the presets' names and records from (blobs
    are shared by presets of the same audio, so they cannot carry names). ``root/.index-id`` names the index
    they belong to: an index with another id, or none, is not theirs.
    """

    ID_FILE = ".index-id"

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        if not valid_voice_name(name):
            raise ValueError(f"bad voice name {name!r}")
        return self.root / f"{name}.json"

    def read(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.path(name), data)

    def delete(self, name: str) -> bool:
        """Remove (durably) the file of ``name``; False when there was none."""
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        return True

    def set_aside(self, name: str) -> Path | None:
        """Rename the file of ``name`` to a temp name (no space needed; a crash leaves a temp file that
        ``check --fix`` removes); returns it, or None when there was none. `restore` undoes it."""
        aside = self.root / f".tmp-deleting-{name}-{time.time_ns()}.json"
        try:
            os.replace(self.path(name), aside)
        except FileNotFoundError:
            return None
        fsync_dir(self.root)
        return aside

    def restore(self, aside: Path, name: str) -> None:
        os.replace(aside, self.path(name))
        fsync_dir(self.root)

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json") if valid_voice_name(p.stem))

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob(".tmp-*"))

    def read_id(self) -> str | None:
        try:
            return (self.root / self.ID_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_id(self, index_id: str) -> None:
        atomic_write(self.root / self.ID_FILE, index_id.encode())

    def any(self) -> bool:
        return self.root.is_dir() and any(True for _ in self.root.glob("*.json"))
