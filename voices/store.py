"""Content-addressed latent blobs (safetensors) with atomic writes and verified reads."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tts_gateway.errors import Conflict

log = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class CorruptBlob(Conflict):
    """A blob's bytes do not match the sha256 recorded for it; it was quarantined."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"latent blob {key[:12]}… is corrupt: {detail}", code="corrupt-latents")
        self.key = key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """temp file → fsync → rename → fsync dir: a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class LatentStore:
    """Blobs named by a content key under ``root/<k[:2]>/<key>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.quarantine = root.parent / "quarantine"
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"bad blob key {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, latents: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
        """Write the blob atomically; returns the sha256 of its bytes."""
        data = st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in latents.items()},
                       metadata=metadata)
        atomic_write(self.path(key), data)
        return hashlib.sha256(data).hexdigest()

    def get(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """Read and verify; a mismatch moves the file to quarantine and raises `CorruptBlob`."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptBlob(key, "file is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            self._quarantine(key, path)
            raise CorruptBlob(key, f"sha256 {actual[:12]}… != recorded {sha256[:12]}…")
        try:
            return dict(st_load(data))
        except Exception as exc:  # safetensors raises its own error type for bad headers
            self._quarantine(key, path)
            raise CorruptBlob(key, f"not a safetensors file: {exc}") from None

    def sha256_of(self, key: str) -> str | None:
        try:
            return hashlib.sha256(self.path(key).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*/*.safetensors") if _KEY_RE.match(p.stem))

    def temp_files(self) -> list[Path]:
        return sorted(self.root.glob("*/.tmp-*"))

    def _quarantine(self, key: str, path: Path) -> None:
        self.quarantine.mkdir(parents=True, exist_ok=True)
        target = self.quarantine / f"{key}.{int(time.time())}.safetensors"
        try:
            os.replace(path, target)
            log.warning("quarantined corrupt latent blob %s to %s", key, target)
        except FileNotFoundError:
            pass
