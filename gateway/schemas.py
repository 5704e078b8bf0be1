"""Request bodies (msgspec Structs: unknown fields are rejected)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from litestar.datastructures import UploadFile


class SynthesizeBody(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    voice: str | None = None
    language: str | None = None
    format: str = "wav"
    sample_rate: int | None = None
    speed: float = 1.0
    stream: bool = False
    seed: int | None = None
    cache: bool = True


class SpeechBody(msgspec.Struct):
    """OpenAI ``POST /v1/audio/speech``; unknown fields (e.g. ``instructions``) are ignored."""

    input: str
    model: str = "tts-1"
    voice: str | None = None
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str | None = None


@dataclass
class VoiceForm:
    name: str
    audio: list[UploadFile] = field(default_factory=list)
    engine: str = "xtts"
    language: str | None = None
    description: str = ""
    consent: str = "false"


@dataclass
class LegacyForm:
    text: str
    speaker_audio: UploadFile
    language: str = "en"
