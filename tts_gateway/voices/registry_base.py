"""What the local and the PostgreSQL registries share: naming rules, the single-flight conditioning of a
reference, the in-memory cache of verified latents and a preset's way from ``create`` to its record.

A backend (`LocalVoiceRegistry`, `PostgresVoiceRegistry`) supplies only what its storage decides: how stored
latents are found (`RegistryBase._stored`), how fresh ones are kept (`_store`), how a preset is committed
(`_insert`), how blobs are read (`load_latents`) and how a preset is marked broken (`_mark_broken`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.errors import InvalidField
from tts_gateway.voices.audio import ReferenceAudio
from tts_gateway.voices.blobs import CorruptBlob, blob_metadata
from tts_gateway.voices.cache import LatentCache, Latents
from tts_gateway.voices.names import NAME_RULE, valid_voice_name
from tts_gateway.voices.registry import ComputeLatents, VoiceBroken, VoiceExists, VoiceRecord, latents_key
from tts_gateway.voices.store import LatentStore

UPLOAD_CACHE_ENTRIES = 256  # upload-cache entries (latents of ``/synthesize`` uploads no preset uses) kept


@dataclass(frozen=True)
class Conditioned:
    """Latents of one reference on one engine and model, as stored under blob ``key``."""

    key: str
    sha256: str
    latents: Latents
    data: bytes | None = None  # the blob's bytes when this call encoded them (a backend may cache them)


@dataclass(frozen=True)
class NewVoice:
    """A preset being created: what `RegistryBase.create` was given, with its blob key and metadata."""

    name: str
    reference: ReferenceAudio
    key: str
    meta: dict[str, str]
    fields: dict[str, Any]  # the record's own fields: engine, language, description, consent, …

    def record(self, sha256: str) -> VoiceRecord:
        """The preset's record, naming the blob of sha256 ``sha256``."""
        return VoiceRecord.new(self.name, self.reference, latents_key=self.key, latents_sha256=sha256,
                               **self.fields)


class RegistryBase(ABC):
    """The skeleton of a `VoiceRegistry` (see `tts_gateway.voices.registry` for the contract).

    Args:
        data_dir: The gateway's data directory.
        blobs: Where this node keeps latent blobs (the local registry's store, PostgreSQL's read cache).
        on_conditioning: Called with the engine name each time latents are computed.
        on_cache_hit: Called with the engine name when stored latents are reused.
        memory_entries: How many verified latent sets to keep in memory.
        upload_cache_entries: How many upload-cache entries (latents no preset uses) to keep; past that, the
            least recently used go with their blobs.
    """

    def __init__(self, data_dir: Path, blobs: Path, *, on_conditioning: Callable[[str], None],
                 on_cache_hit: Callable[[str], None], memory_entries: int, upload_cache_entries: int) -> None:
        self.data_dir = data_dir
        self.store = LatentStore(blobs)
        self.cache = LatentCache(memory_entries)
        self.upload_cache_entries = max(0, upload_cache_entries)
        self._on_conditioning = on_conditioning
        self._on_cache_hit = on_cache_hit

    # -- what a backend supplies --------------------------------------------------------------------
    @abstractmethod
    def exists(self, name: str) -> bool:
        ...

    @abstractmethod
    def load_latents(self, key: str, sha256: str) -> dict[str, np.ndarray]:
        ...

    @abstractmethod
    def _mark_broken(self, record: VoiceRecord, detail: str) -> None:
        """Record that ``record``'s blob failed verification (best effort where the backend says so)."""

    @abstractmethod
    def _stored(self, key: str, meta: dict[str, str], *, for_preset: bool) -> Conditioned | None:
        """The usable stored latents of ``key`` (the caller holds its lock), or None."""

    @abstractmethod
    def _store(self, key: str, meta: dict[str, str], computed: Latents, *, for_preset: bool) -> Conditioned:
        """Keep freshly computed latents as ``key`` (the caller holds its lock); another writer's valid blob
        may win, and then its latents are returned."""

    @abstractmethod
    def _insert(self, voice: NewVoice, conditioned: Conditioned) -> VoiceRecord:
        """Commit the preset (the caller holds its key's lock); `VoiceExists` if the name was taken meanwhile."""

    def _check_text(self, field_name: str, value: str) -> None:
        """Refuse a text field the storage cannot hold (`InvalidField`); before any latents are computed."""
        return  # by default any text can be stored

    def _preflight(self) -> None:
        """Refuse a preset the storage cannot take now, before its latents are computed (a costly step)."""
        return  # by default nothing is known before the commit itself

    # -- reading --------------------------------------------------------------------------------------
    def latents(self, record: VoiceRecord) -> dict[str, np.ndarray]:
        """Verified latents of a preset; never recomputes. Raises `VoiceBroken`."""
        try:
            return self.load_latents(record.latents_key, record.latents_sha256)
        except CorruptBlob as exc:
            self._mark_broken(record, str(exc))
            raise VoiceBroken(record.name, str(exc)) from None

    def forget(self, sha256: str) -> None:
        self.cache.forget(sha256)

    # -- conditioning -----------------------------------------------------------------------------------
    def condition(
        self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents
    ) -> tuple[str, str, dict[str, np.ndarray]]:
        """Latents for this audio on this engine and model: stored ones (any node's) if any, else computed once.

        Returns (blob key, blob sha256, latents). Single-flight per key: a second caller waits for the first
        and reuses its blob. Storage that cannot take the new blob costs the local registry only the caching:
        the latents are returned all the same (and the failure logged).
        """
        found = self._conditioned(reference, engine, model_sha256, compute, for_preset=False)
        return found.key, found.sha256, found.latents

    def _conditioned(self, reference: ReferenceAudio, engine: str, model_sha256: str, compute: ComputeLatents,
                     *, for_preset: bool) -> Conditioned:
        key = latents_key(reference.sha256, engine, model_sha256)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        with self.cache.lock(key):  # single-flight on this node; across nodes the backend's first writer wins
            stored = self._stored(key, meta, for_preset=for_preset)
            if stored is not None:
                self._on_cache_hit(engine)
                return stored
            if for_preset:
                self._preflight()
            computed = compute(reference.samples)
            self._on_conditioning(engine)
            return self._store(key, meta, computed, for_preset=for_preset)

    # -- writing ------------------------------------------------------------------------------------------
    def create(self, name: str, *, engine: str, reference: ReferenceAudio, compute: ComputeLatents, model_id: str,
               model_sha256: str, licence: str, language: str | None = None, description: str = "",
               consent: bool = False, extra: dict[str, Any] | None = None) -> VoiceRecord:
        """Register a preset; raises `VoiceExists` if the name is taken (checked here and again at commit), and
        `RegistryUnavailable` (nothing written) when the storage cannot take it."""
        if not valid_voice_name(name):
            raise InvalidField("name", NAME_RULE)
        for field_name, value in (("description", description), ("language", language), ("engine", engine),
                                  ("licence", licence), ("model_id", model_id)):
            if value is not None:
                self._check_text(field_name, value)
        if self.exists(name):
            raise VoiceExists(name)
        meta = blob_metadata(engine=engine, model_sha256=model_sha256, audio_sha256=reference.sha256)
        voice = NewVoice(name, reference, latents_key(reference.sha256, engine, model_sha256), meta, {
            "engine": engine, "language": language, "description": description, "consent": consent,
            "licence": licence, "model_id": model_id, "model_sha256": model_sha256, "extra": dict(extra or {})})
        # The key's lock spans conditioning and commit: a delete of another preset of the same audio cannot
        # remove the blob in between.
        with self.cache.lock(voice.key):
            conditioned = self._conditioned(reference, engine, model_sha256, compute, for_preset=True)
            return self._insert(voice, conditioned)
