"""File helpers shared by engines."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, memoised by path, size and mtime: a model's identity, hashed once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


__all__ = ["file_sha256"]
