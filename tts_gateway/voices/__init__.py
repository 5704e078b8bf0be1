"""The voice registry: presets whose conditioning latents are computed once and kept on disk."""

from tts_gateway.voices.audio import ReferenceAudio, prepare_reference
from tts_gateway.voices.registry import (
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
)
from tts_gateway.voices.store import CorruptBlob, LatentStore

__all__ = [
    "CorruptBlob",
    "LatentStore",
    "ReferenceAudio",
    "VoiceBroken",
    "VoiceExists",
    "VoiceNotFound",
    "VoiceRecord",
    "VoiceRegistry",
    "prepare_reference",
]
