"""Giving unloaded model memory back to the operating system."""

from __future__ import annotations

import gc


def release_memory() -> None:
    """Return freed model memory to the OS (glibc keeps it otherwise, and RSS never drops)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
