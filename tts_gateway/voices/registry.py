"""The voice registry contract: named presets → verified latents, surviving restarts, no pickle anywhere.

`VoiceRegistry` is the protocol; `LocalVoiceRegistry` (diskcache + files, one node) and
`PostgresVoiceRegistry` (PostgreSQL, shared by nodes; the ``postgres`` extra) implement it on one skeleton,
`tts_gateway.voices.registry_base.RegistryBase` (naming rules, single-flight conditioning, the in-memory
cache and blob verification), and differ only where their storage does.
``tts_gateway.voices.open_registry`` picks one from the settings.

Guarantees every implementation keeps (tests/test_registry.py checks them on both):

* A voice is acknowledged (``create`` returns) only once its record and its blob are durable, and the
  record names the blob by the sha256 of its bytes (``voice_sha256``).
* Blobs are canonical (`tts_gateway.voices.blobs.encode`) and written once, under a per-key lock: two
  threads conditioning the same audio compute it once; an existing valid blob is never overwritten.
* A blob another record or the upload cache still uses is never quarantined or deleted; create and
  delete of presets sharing audio never leave an acknowledged record without its blob.
* Storage that cannot be written (read-only, full) or an index that is damaged or missing (and not rebuilt:
  the local registry rebuilds one it finds so at start) is a `RegistryUnavailable` (503) naming the cause,
  never a 500, and leaves nothing half-written. Listing the voices is refused with it too (a list without the
  presets would read as if they had been deleted). ``delete``
  removes the record first (that is its acknowledgement) and frees the blob afterwards, best effort.
* The upload cache (``condition`` entries no preset uses) is bounded: past ``upload_cache_entries`` the least
  recently used entries and their blobs go; a preset's blob never does.
* ``health()`` is None while the registry can serve, else the reason it cannot (for a readiness check).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tts_gateway.errors import Conflict, NotFound, Unavailable
from tts_gateway.voices.audio import ReferenceAudio

ComputeLatents = Callable[[np.ndarray], dict[str, np.ndarray]]


class VoiceNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown voice {name!r}; GET /v1/voices lists the voices", code="unknown-voice")
        self.name = name


class VoiceExists(Conflict):
    def __init__(self, name: str) -> None:
        super().__init__(f"a voice named {name!r} already exists; delete it first or choose another name",
                         code="voice-exists")
        self.name = name


class RegistryUnavailable(Unavailable):
    """The registry cannot be used right now: its index is damaged or missing, its storage cannot be written,
    or its database cannot be reached (HTTP 503 with Retry-After). ``detail`` says why and what to do."""

    def __init__(self, detail: str, *, code: str = "registry-unavailable", retry_after: int | None = 5) -> None:
        super().__init__(detail, retry_after=retry_after, code=code)


class RegistryConnectError(Unavailable):
    """The registry database could not be reached or set up at start (the CLI reports it and exits)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="registry-unavailable")


class VoiceBroken(Conflict):
    def __init__(self, name: str, detail: str) -> None:
        super().__init__(
            f"voice {name!r} is broken ({detail}); its latents were quarantined — delete it and register it again",
            code="voice-broken")
        self.name = name


@dataclass
class VoiceRecord:
    name: str
    engine: str
    language: str | None
    description: str
    consent: bool
    licence: str
    model_id: str
    model_sha256: str
    audio_sha256: str
    clip_sha256s: list[str]
    duration: float
    created_at: str
    latents_key: str
    latents_sha256: str
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def voice_sha256(self) -> str:
        return self.latents_sha256

    @classmethod
    def new(cls, name: str, reference: ReferenceAudio, *, latents_key: str, latents_sha256: str,
            **fields: Any) -> VoiceRecord:
        """A fresh record for ``reference``: the audio facts and the creation time filled in."""
        return cls(
            name=name,
            audio_sha256=reference.sha256,
            clip_sha256s=list(reference.clip_sha256s),
            duration=round(reference.duration, 3),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            latents_key=latents_key,
            latents_sha256=latents_sha256,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VoiceRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json(cls, data: bytes | str) -> VoiceRecord:
        return cls.from_dict(json.loads(data))


def latents_key(audio_sha256: str, engine: str, model_sha256: str) -> str:
    """The blob key of this audio on this engine and model (the same inputs always give the same key)."""
    return hashlib.sha256(f"{audio_sha256}\0{engine}\0{model_sha256}".encode()).hexdigest()


@runtime_checkable
class VoiceRegistry(Protocol):
    """Presets and the upload cache of the old ``/synthesize`` call.

    Errors: `VoiceNotFound` (404), `VoiceExists` / `VoiceBroken` / `CorruptBlob` (409), `RegistryUnavailable`
    (503: damaged or missing index, storage that cannot be written, database unreachable).
    """

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> str | None:
        """None while the registry can serve reads, else why it cannot (one line, with the recovery step).

        Cheap enough for a readiness check; never raises. A data directory that is merely full or read-only
        while the index is open is not reported (reads still work; writes answer 503 themselves).
        """
        ...

    # -- reading --------------------------------------------------------------------------------
    def get(self, name: str) -> VoiceRecord:
        """The record of preset ``name``; `VoiceNotFound` (also for names that break the naming rule)."""
        ...

    def exists(self, name: str) -> bool:
        ...

    def records(self) -> list[VoiceRecord]:
        """Every preset, sorted by name."""
        ...

    def latents(self, record: VoiceRecord) -> dict[str, np.ndarray]:
        """Verified latents of a preset; never recomputes. On a bad blob: the record is marked broken and
        `VoiceBroken` raised (other presets sharing the blob are not affected)."""
        ...

    def load_latents(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        """The latents of blob ``key`` verified against ``sha256`` (memory first); raises `CorruptBlob`."""
        ...

    def forget(self, sha256: str) -> None:
        """Drop a blob's latents from the memory cache (storage is untouched)."""
        ...

    # -- conditioning ---------------------------------------------------------------------------
    def condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Latents for this audio on this engine and model: the stored ones, else computed once and stored.

        Returns (blob key, blob sha256, latents). The upload cache of the old ``/synthesize`` call uses
        this directly; presets use it through `create`.
        """
        ...

    # -- writing --------------------------------------------------------------------------------
    def create(
        self,
        name: str,
        *,
        engine: str,
        reference: ReferenceAudio,
        compute: ComputeLatents,
        model_id: str,
        model_sha256: str,
        licence: str,
        language: str | None = None,
        description: str = "",
        consent: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> VoiceRecord:
        """Register a preset; `VoiceExists` if the name is taken (checked early and again at commit)."""
        ...

    def delete(self, name: str) -> VoiceRecord:
        """Remove a preset; `VoiceNotFound` if there is none (so a repeated delete is a 404).

        Atomic: the record goes first (or, on a storage error, nothing changes and `RegistryUnavailable` is
        raised); then its blob is freed once nothing else uses it. Failing to free the blob does not fail
        the delete: it is logged, and ``check(fix=True)`` or the upload cache's bound removes it later.
        """
        ...

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """``{"broken": [names], "orphans": [...], "temp_files": [...]}``; ``fix`` marks broken voices
        and removes orphans and temp files. Never removes what a rebuild of the index could still recover:
        when the index lists nothing but blobs are stored, the report also holds ``"rebuild_needed":
        [reason]`` and ``fix`` deletes no blob."""
        ...

    def close(self) -> None:
        ...
