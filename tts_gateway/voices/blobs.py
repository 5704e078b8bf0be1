"""The latent blob format: canonical safetensors bytes, and their verification.

A blob is named by the sha256 of its bytes (a voice's ``voice_sha256``), so the same latents must always
give the same bytes. ``safetensors.numpy.save`` does not: it writes metadata in hash-map order, and the
same latents saved 50 times gave 6 different files. `encode` therefore writes the (simple) safetensors
layout itself — tensors in name order, float32 little-endian, a JSON header with sorted keys and no
spaces, padded to 8 bytes — and any safetensors reader loads it.

The metadata names what the latents were computed from (engine, model sha256, audio sha256), enough to
rebuild an index from the blobs alone.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as st_load

from tts_gateway.errors import Conflict

_FORMAT = "tts-gateway/latents-1"


class CorruptBlob(Conflict):
    """A blob's bytes are missing, unreadable or do not match the sha256 recorded for them."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"latent blob {key[:12]}… is corrupt: {detail}", code="corrupt-latents")
        self.key = key


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_metadata(*, engine: str, model_sha256: str, audio_sha256: str) -> dict[str, str]:
    """What a blob records about its origin (stored in the safetensors ``__metadata__``)."""
    return {"audio_sha256": audio_sha256, "engine": engine, "format": _FORMAT, "model_sha256": model_sha256}


def encode(latents: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Canonical safetensors bytes: equal latents and metadata always give equal bytes."""
    tensors: list[tuple[str, np.ndarray]] = []
    for name in sorted(latents):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"bad latent name {name!r}")
        tensors.append((name, np.asarray(latents[name], dtype="<f4")))
    header: dict[str, object] = {}
    offset = 0
    for name, array in tensors:
        header[name] = {"data_offsets": [offset, offset + array.nbytes], "dtype": "F32", "shape": list(array.shape)}
        offset += array.nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("blob metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, *(array.tobytes(order="C") for _, array in tensors)])


def decode(data: bytes, sha256: str, *, label: str | None = None) -> dict[str, np.ndarray]:
    """The latents in ``data`` once its sha256 is ``sha256``; `CorruptBlob` (named ``label``) otherwise."""
    label = label or sha256
    actual = sha256_hex(data)
    if actual != sha256:
        raise CorruptBlob(label, f"sha256 {actual[:12]}… != recorded {sha256[:12]}…")
    try:
        return dict(st_load(data))
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise CorruptBlob(label, f"not a safetensors file: {exc}") from None


def problem(data: bytes | None, sha256: str) -> str | None:
    """What is wrong with ``data`` as the blob ``sha256`` (None when it verifies)."""
    if data is None:
        return "blob is missing"
    try:
        decode(data, sha256)
    except CorruptBlob as exc:
        return exc.detail.partition(": ")[2] or exc.detail
    return None


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes ({} when there is none or the header is unreadable)."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        meta = header.get("__metadata__") if isinstance(header, dict) else None
    except (struct.error, ValueError):
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def contradicts(data: bytes, expected: Mapping[str, str]) -> bool:
    """Whether the blob's metadata names another origin than ``expected`` (keys it lacks are not checked)."""
    found = read_metadata(data)
    return any(k in found and found[k] != v for k, v in expected.items() if k != "format")
