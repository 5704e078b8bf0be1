"""VoiceRegistry: named presets → verified latents, surviving restarts, with no pickle anywhere.

Layout under ``<data_dir>/voices``:
  blobs/<k[:2]>/<key>.safetensors   latents; key = sha256(audio sha256, engine, model sha256)
  index/                            diskcache (SQLite), eviction off; values are JSON bytes
  quarantine/                       blobs that failed their sha256 check

A voice is acknowledged only once its JSON record is in the index, and the record is written
only after its blob is durably on disk; a crash in between leaves at most an orphan blob, which
``check(fix=True)`` removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

from tts_gateway.voices.names import VOICE_NAME_RE
from tts_gateway.errors import Conflict, NotFound
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.store import CorruptBlob, LatentStore

log = logging.getLogger(__name__)

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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VoiceRecord:
        raw = json.loads(data)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def latents_key(audio_sha256: str, engine: str, model_sha256: str) -> str:
    return hashlib.sha256(f"{audio_sha256}\0{engine}\0{model_sha256}".encode()).hexdigest()


class VoiceRegistry:
    """Presets and the upload cache of the old ``/synthesize`` call, over one `LatentStore`.

    Args:
        data_dir: The gateway's data directory.
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        on_conditioning: Callable[[str], None] = lambda engine: None,
        on_cache_hit: Callable[[str], None] = lambda engine: None,
        memory_entries: int = 64,
    ) -> None:
        self.root = data_dir / "voices"
        self.store = LatentStore(self.root / "blobs")
        # eviction_policy="none": the default culls past 1 GB, which would silently drop voices.
        self.index = diskcache.Cache(
            str(self.root / "index"), eviction_policy="none", sqlite_synchronous=2, size_limit=2**62
        )
        self._on_conditioning = on_conditioning
        self._on_cache_hit = on_cache_hit
        self._lock = threading.RLock()  # orders blob writes, record adds and blob deletes
        self._memory: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._memory_entries = memory_entries
        self._memory_lock = threading.Lock()

    def close(self) -> None:
        self.index.close()

    # -- reading --------------------------------------------------------------------------------
    def get(self, name: str) -> VoiceRecord:
        if not VOICE_NAME_RE.fullmatch(name):
            raise VoiceNotFound(name)
        data = self.index.get(f"voice:{name}")
        if not isinstance(data, bytes):
            raise VoiceNotFound(name)
        return VoiceRecord.from_json(data)

    def exists(self, name: str) -> bool:
        return bool(VOICE_NAME_RE.fullmatch(name)) and f"voice:{name}" in self.index

    def records(self) -> list[VoiceRecord]:
        records = []
        for key in self.index.iterkeys():
            if isinstance(key, str) and key.startswith("voice:"):
                data = self.index.get(key)
                if isinstance(data, bytes):
                    records.append(VoiceRecord.from_json(data))
        return sorted(records, key=lambda r: r.name)

    def latents(self, record: VoiceRecord) -> dict[str, np.ndarray]:
        """Verified latents of a preset; never recomputes. Raises `VoiceBroken`."""
        try:
            return self._load(record.latents_key, record.latents_sha256)
        except CorruptBlob as exc:
            self._mark_broken(record, str(exc))
            raise VoiceBroken(record.name, str(exc)) from None

    def _load(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        with self._memory_lock:
            cached = self._memory.get(sha256)
            if cached is not None:
                self._memory.move_to_end(sha256)
                return cached
        latents = self.store.get(key, sha256)
        with self._memory_lock:
            self._memory[sha256] = latents
            while len(self._memory) > self._memory_entries:
                self._memory.popitem(last=False)
        return latents

    def _forget(self, sha256: str) -> None:
        with self._memory_lock:
            self._memory.pop(sha256, None)

    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        self._forget(record.latents_sha256)
        with self._lock:
            current = self.index.get(f"voice:{record.name}")
            if isinstance(current, bytes):
                fresh = VoiceRecord.from_json(current)
                if fresh.latents_sha256 == record.latents_sha256 and fresh.status != "broken":
                    fresh.status = "broken"
                    fresh.extra["broken_reason"] = detail
                    self.index.set(f"voice:{record.name}", fresh.to_json())
        log.error("voice %s marked broken: %s", record.name, detail)

    # -- conditioning ---------------------------------------------------------------------------
    def condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Latents for this audio on this engine and model: stored ones if any, else computed once.

        Returns (blob key, blob sha256, latents). The upload cache of the old ``/synthesize``
        call uses this directly; presets use it through `create`.
        """
        key = latents_key(reference.sha256, engine, model_sha256)
        pointer = self.index.get(f"audio:{key}")
        if isinstance(pointer, bytes):
            sha = json.loads(pointer)["latents_sha256"]
            try:
                latents = self._load(key, sha)
                self._on_cache_hit(engine)
                return key, sha, latents
            except CorruptBlob as exc:
                log.warning("recomputing latents: %s", exc)
                self.index.delete(f"audio:{key}")
        latents = compute(reference.samples)
        self._on_conditioning(engine)
        meta = {"engine": engine, "model_sha256": model_sha256, "audio_sha256": reference.sha256}
        with self._lock:
            sha = self.store.put(key, latents, meta)
            self.index.set(f"audio:{key}", json.dumps({"latents_sha256": sha}).encode())
        with self._memory_lock:
            self._memory[sha] = latents
        return key, sha, latents

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
    ) -> VoiceRecord:
        """Register a preset; raises `VoiceExists` if the name is taken (checked again at commit)."""
        if not VOICE_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid voice name {name!r}")
        if self.exists(name):
            raise VoiceExists(name)
        key, sha, latents = self.condition(reference, engine, model_sha256, compute)
        record = VoiceRecord.new(name, reference, latents_key=key, latents_sha256=sha, engine=engine,
                                 language=language, description=description, consent=consent, licence=licence,
                                 model_id=model_id, model_sha256=model_sha256)
        with self._lock:
            if self.store.sha256_of(key) != sha:  # removed or replaced since: write it again
                sha = self.store.put(key, latents, {"engine": engine, "model_sha256": model_sha256})
                record.latents_sha256 = sha
            # diskcache's add is one SQLite transaction: of two racing creators exactly one wins.
            if not self.index.add(f"voice:{name}", record.to_json()):
                raise VoiceExists(name)
        return record

    def delete(self, name: str) -> VoiceRecord:
        with self._lock:
            record = self.get(name)
            if not self.index.delete(f"voice:{name}"):
                raise VoiceNotFound(name)
            self._forget(record.latents_sha256)
            # Free the blob unless another preset shares it (same audio registered twice).
            if not any(r.latents_key == record.latents_key for r in self.records()):
                self.index.delete(f"audio:{record.latents_key}")
                self.store.delete(record.latents_key)
        return record

    # -- maintenance ----------------------------------------------------------------------------
    def check(self, fix: bool = False) -> dict[str, list[str]]:
        """Find broken voices, orphan blobs and leftover temp files; remove the latter with ``fix``."""
        report: dict[str, list[str]] = {"broken": [], "orphans": [], "temp_files": []}
        with self._lock:
            referenced = set()
            for record in self.records():
                referenced.add(record.latents_key)
                if self.store.sha256_of(record.latents_key) != record.latents_sha256:
                    report["broken"].append(record.name)
                    if fix and record.status != "broken":
                        try:
                            self.latents(record)
                        except VoiceBroken:
                            pass
            for key in self.index.iterkeys():
                if isinstance(key, str) and key.startswith("audio:"):
                    referenced.add(key.removeprefix("audio:"))
            for key in self.store.keys():
                if key not in referenced:
                    report["orphans"].append(key)
                    if fix:
                        self.store.delete(key)
            for tmp in self.store.temp_files():
                report["temp_files"].append(str(tmp))
                if fix:
                    tmp.unlink(missing_ok=True)
        return report
