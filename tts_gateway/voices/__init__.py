"""The voice registry: presets whose conditioning latents are computed once and kept (verified) for good.

`VoiceRegistry` is the protocol; `open_registry` returns the implementation the settings ask for:
`PostgresVoiceRegistry` when ``registry_url`` is set, else `LocalVoiceRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable

from tts_gateway.config import Settings
from tts_gateway.voices.audio import ReferenceAudio, prepare_reference
from tts_gateway.voices.blobs import CorruptBlob
from tts_gateway.voices.cache import LatentCache
from tts_gateway.voices.local_registry import LocalVoiceRegistry, rebuild_index
from tts_gateway.voices.names import VOICE_NAME_RE, valid_voice_name
from tts_gateway.voices.pg_registry import PostgresVoiceRegistry, RegistryConnectError
from tts_gateway.voices.registry import (
    RegistryUnavailable,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
)
from tts_gateway.voices.store import LatentStore, StorageUnavailable


def open_registry(
    settings: Settings,
    *,
    on_conditioning: Callable[[str], None] = lambda engine: None,
    on_cache_hit: Callable[[str], None] = lambda engine: None,
    rebuild_damaged: bool = True,
) -> VoiceRegistry:
    """The registry the settings ask for: PostgreSQL when ``registry_url`` is set, else the local one.

    Raises `RegistryConnectError` when the database cannot be reached or set up. A local index that is
    damaged, missing or replaced is rebuilt from the record files and blobs (the damaged one moved aside,
    what was recovered logged) unless ``rebuild_damaged`` is off (``registry check`` only reports). A local
    registry that still cannot serve (the rebuild failed, the data directory cannot be used) does not raise:
    it logs one line (the cause and ``tts-gateway registry rebuild``) and reports itself unavailable
    (``health()``, 503 from every call), so that the built-in voices keep working.
    """
    if settings.registry_url:
        return PostgresVoiceRegistry(settings.data_dir, url=settings.registry_url,
                                     on_conditioning=on_conditioning, on_cache_hit=on_cache_hit)
    return LocalVoiceRegistry(settings.data_dir, on_conditioning=on_conditioning, on_cache_hit=on_cache_hit,
                              rebuild_damaged=rebuild_damaged)


__all__ = [
    "VOICE_NAME_RE",
    "CorruptBlob",
    "LatentCache",
    "LatentStore",
    "LocalVoiceRegistry",
    "PostgresVoiceRegistry",
    "ReferenceAudio",
    "RegistryConnectError",
    "RegistryUnavailable",
    "StorageUnavailable",
    "VoiceBroken",
    "VoiceExists",
    "VoiceNotFound",
    "VoiceRecord",
    "VoiceRegistry",
    "open_registry",
    "prepare_reference",
    "rebuild_index",
    "valid_voice_name",
]
