"""Response bodies of the JSON routes, as msgspec Structs: the OpenAPI schema is generated from these.

The core describes voices, engines and the cache as plain dicts; the controllers convert them into
these types (`msgspec.convert`), so the JSON a client sees is exactly what is declared here.
"""

from __future__ import annotations

from typing import Literal

import msgspec


# -- voices --------------------------------------------------------------------------------------------
class BuiltinVoice(msgspec.Struct, tag_field="kind", tag="builtin"):
    """A voice an engine ships (``engine:voice``); read-only."""

    name: str
    engine: str
    language: str
    languages: list[str]  # every language it speaks; its own (``language``) first
    description: str
    licence: str
    read_only: bool
    status: str


class PresetModel(msgspec.Struct):
    id: str
    sha256: str


class PresetVoice(msgspec.Struct, tag_field="kind", tag="preset"):
    """A registered voice: stored latents of one cloning engine."""

    name: str
    engine: str
    language: str | None
    description: str
    consent: bool
    licence: str
    read_only: bool
    status: str
    created_at: str
    duration: float
    audio_sha256: str
    clip_sha256s: list[str]
    voice_sha256: str
    model: PresetModel
    blend: str | None = None  # a blended preset's recipe, e.g. "jf_alpha:0.6,jf_nezumi:0.4"


Voice = BuiltinVoice | PresetVoice


class VoiceList(msgspec.Struct):
    voices: list[Voice]


# -- engines and languages --------------------------------------------------------------------------------
class EngineCapabilities(msgspec.Struct):
    cloning: bool
    streaming: bool
    timestamps: list[str]  # the levels `POST /v1/synthesize` can time: "sentence", and "word" when the engine can


class EngineModel(msgspec.Struct):
    id: str
    sha256: str | None
    licence: str


class EngineReplica(msgspec.Struct):
    """One Ray Serve replica of an engine (ray mode), as it last reported."""

    id: str
    node: str
    pid: int
    loaded: bool
    in_flight: int
    completed: int
    failed: int
    rss_bytes: int
    last_report_s: float


class Engine(msgspec.Struct, omit_defaults=True):
    name: str
    available: bool
    reason: str | None
    loaded: bool
    languages: list[str]
    capabilities: EngineCapabilities
    sample_rate: int
    model: EngineModel | None
    voices: list[str]
    # Ray mode only (absent otherwise): the live replicas; ``loaded`` is then true when any of them is
    replicas: list[EngineReplica] | None = None


class EngineList(msgspec.Struct):
    engines: list[Engine]


class Language(msgspec.Struct):
    code: str
    name: str
    engines: list[str]


# -- phrase cache -------------------------------------------------------------------------------------------
class CacheStats(msgspec.Struct):
    enabled: bool
    entries: int
    bytes: int
    size_limit: int
    hits: int
    misses: int
    hit_ratio: float | None


# -- operations ---------------------------------------------------------------------------------------------
class Health(msgspec.Struct):
    status: Literal["ok"]
    version: str


class Ready(msgspec.Struct):
    status: Literal["ready"]
    detail: str


# -- OpenAI discovery -----------------------------------------------------------------------------------------
class OpenAIModel(msgspec.Struct, kw_only=True):
    """One entry of OpenAI's ``GET /v1/models`` list."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIVoice(msgspec.Struct):
    id: str
    name: str


class OpenAIVoiceList(msgspec.Struct):
    """What Open WebUI and Kokoro-FastAPI clients read from ``GET {base}/audio/voices``.

    ``{id, name}`` objects, or plain names with ``?legacy=true`` (Kokoro-FastAPI's older shape).
    """

    voices: list[OpenAIVoice | str]


class SpokenPiece(msgspec.Struct):
    """One engine call of a dry run (``POST /v1/text/normalize``): its text, language, speed and silence before."""

    text: str
    language: str
    speed: float
    pause_before: float  # seconds of silence before it


class NormalizeResult(msgspec.Struct):
    """What ``POST /v1/text/normalize`` answers: the text as it will be spoken, piece by piece."""

    text: str
    language: str
    voice: str
    engine: str
    pieces: list[SpokenPiece]
    pause_after: float
    lexicon: list[str]


class LexiconEntryBody(msgspec.Struct, omit_defaults=True):
    """One lexicon entry; ``voice`` names the preset whose own entry it is."""

    word: str
    language: str
    respelling: str | None = None
    ipa: str | None = None
    voice: str | None = None


__all__ = [
    "BuiltinVoice", "CacheStats", "Engine", "EngineCapabilities", "EngineList", "EngineModel", "Health",
    "Language", "LexiconEntryBody", "NormalizeResult", "OpenAIModel", "OpenAIModelList", "OpenAIVoice",
    "OpenAIVoiceList", "PresetModel", "PresetVoice", "Ready", "SpokenPiece", "Voice", "VoiceList",
]

