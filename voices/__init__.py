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
from tts_gateway.voices.local_registry import LocalVoiceRegistry
from tts_gateway.voices.names import VOICE_NAME_RE, valid_voice_name
from tts_gateway.voices.pg_registry import PostgresVoiceRegistry, RegistryConnectError, RegistryUnavailable
from tts_gateway.voices.registry import (
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
)
from tts_gateway.voices.store import LatentStore


def open_registry(
    settings: Settings,
    *,
    on_conditioning: Callable[[str], None] = lambda engine: None,
    on_cache_hit: Callable[[str], None] = lambda engine: None,
) -> VoiceRegistry:
    """The registry the settings ask for: PostgreSQL when ``registry_url`` is set, else the local one.

    Raises `RegistryConnectError` when the database cannot be reached or set up.
    """
    if settings.registry_url:
        return PostgresVoiceRegistry(settings.data_dir, url=settings.registry_url,
                                     on_conditioning=on_conditioning, on_cache_hit=on_cache_hit)
    return LocalVoiceRegistry(settings.data_dir, on_conditioning=on_conditioning, on_cache_hit=on_cache_hit)


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
    "VoiceBroken",
    "VoiceExists",
    "VoiceNotFound",
    "VoiceRecord",
    "VoiceRegistry",
    "open_registry",
    "prepare_reference",
    "valid_voice_name",
]
