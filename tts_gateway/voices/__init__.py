"""The voice registry: presets whose conditioning latents are computed once and kept (verified) for good.

`VoiceRegistry` is the protocol; `open_registry` returns the implementation the settings ask for:
`PostgresVoiceRegistry` when ``registry_url`` is set, else `LocalVoiceRegistry`. The PostgreSQL registry is
the ``postgres`` extra (``pip install 'tts-gateway[postgres]'``): psycopg is imported only when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tts_gateway.config import Settings, SettingsError
from tts_gateway.voices.audio import ReferenceAudio, prepare_reference
from tts_gateway.voices.blobs import CorruptBlob
from tts_gateway.voices.cache import LatentCache
from tts_gateway.voices.lexicon import Lexicon, LocalLexicon
from tts_gateway.voices.local_registry import LocalVoiceRegistry, rebuild_index
from tts_gateway.voices.names import VOICE_NAME_RE, valid_voice_name
from tts_gateway.voices.registry import (
    RegistryConnectError,
    RegistryUnavailable,
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
)
from tts_gateway.voices.store import LatentStore, StorageUnavailable

if TYPE_CHECKING:
    from tts_gateway.voices.pg_registry import PostgresVoiceRegistry

POSTGRES_EXTRA = "pip install 'tts-gateway[postgres]'"


def postgres_registry() -> type[PostgresVoiceRegistry]:
    """The PostgreSQL registry class; `SettingsError` naming the extra to install when psycopg is missing."""
    try:
        from tts_gateway.voices.pg_registry import PostgresVoiceRegistry
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("psycopg"):
            raise
        raise SettingsError(f"TTS_GATEWAY_REGISTRY_URL needs the PostgreSQL registry: {POSTGRES_EXTRA} "
                            f"({exc})") from None
    return PostgresVoiceRegistry


def __getattr__(name: str) -> Any:
    if name == "PostgresVoiceRegistry":  # imported on first use: psycopg is an extra
        from tts_gateway.voices.pg_registry import PostgresVoiceRegistry

        return PostgresVoiceRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_registry(
    settings: Settings,
    *,
    on_conditioning: Callable[[str], None] = lambda engine: None,
    on_cache_hit: Callable[[str], None] = lambda engine: None,
    rebuild_damaged: bool = True,
) -> VoiceRegistry:
    """The registry the settings ask for: PostgreSQL when ``registry_url`` is set, else the local one.

    Raises `SettingsError` when ``registry_url`` is set but the ``postgres`` extra is not installed, and
    `RegistryConnectError` when the database cannot be reached or set up. A local index that is
    damaged, missing or replaced is rebuilt from the record files and blobs (the damaged one moved aside,
    what was recovered logged) unless ``rebuild_damaged`` is off (``registry check`` only reports). A local
    registry that still cannot serve (the rebuild failed, the data directory cannot be used) does not raise:
    it logs one line (the cause and ``tts-gateway registry rebuild``) and reports itself unavailable
    (``health()``, 503 from every call), so that the built-in voices keep working.
    """
    if settings.registry_url:
        return postgres_registry()(settings.data_dir, url=settings.registry_url,
                                   on_conditioning=on_conditioning, on_cache_hit=on_cache_hit)
    return LocalVoiceRegistry(settings.data_dir, on_conditioning=on_conditioning, on_cache_hit=on_cache_hit,
                              rebuild_damaged=rebuild_damaged)


def open_lexicon(settings: Settings) -> Lexicon:
    """The pronunciation lexicon, kept where the registry is: PostgreSQL when ``registry_url`` is set, else a file
    in the data directory."""
    if settings.registry_url:
        postgres_registry()  # names the extra to install when psycopg is missing
        from tts_gateway.voices.pg_lexicon import PostgresLexicon

        return PostgresLexicon(settings.registry_url)
    return LocalLexicon(settings.data_dir)


__all__ = [
    "VOICE_NAME_RE",
    "CorruptBlob",
    "LatentCache",
    "LatentStore",
    "Lexicon",
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
    "open_lexicon",
    "open_registry",
    "postgres_registry",
    "prepare_reference",
    "rebuild_index",
    "valid_voice_name",
]
