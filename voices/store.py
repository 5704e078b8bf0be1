"""Latent blob files: written once (atomically, never over an existing file), read back for verification.

The store knows files, not voices: which blob is still in use, and so may or may not be quarantined or
deleted, is the registry's decision.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

from tts_gateway.voices.blobs import CorruptBlob, sha256_hex

log = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

__all__ = ["CorruptBlob", "LatentStore", "atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_copy(path: Path, data: bytes) -> str:
    """``data`` durably in a temp file beside ``path``; returns its name."""
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
        except OSError:  # a file system without hard links: the caller's lock keeps writers apart
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


class LatentStore:
    """Blobs named by a 64-hex key under ``root/<k[:2]>/<key>.safetensors``; bad ones go to ``../quarantine``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.quarantine_dir = root.parent / "quarantine"
        root.mkdir(parents=True, exist_ok=True)

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
