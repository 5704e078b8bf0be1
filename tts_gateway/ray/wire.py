"""What travels between the gateway and a Serve replica: plain values only.

A `SynthesisJob` is a `Plan` without engine objects or numpy (a preset's latents travel as their blob
key and sha256, and the replica loads and verifies them itself); the settings go as JSON-like values
without the API keys; an error raised on a replica comes back as a `ReplicaError` and is rebuilt as
the same `TTSGatewayError` kind on the gateway. Ray is imported only inside functions.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tts_gateway.config import Settings
from tts_gateway.core.timings import TimedBytes
from tts_gateway.core.word_map import Group, WordMap
from tts_gateway.engines.timing import WordTiming
from tts_gateway.errors import TTSGatewayError, Unavailable

log = logging.getLogger(__name__)

APP_PREFIX = "tts-"
BUSY_RETRY_AFTER_S = 2


def app_name(engine: str) -> str:
    """The Serve application and deployment name of an engine."""
    return f"{APP_PREFIX}{engine}"


# -- the job: what travels from the gateway to a replica --------------------------------------------
@dataclass(frozen=True)
class SynthesisJob:
    """A `Plan` as plain values. Exactly one of ``builtin``, (``latents_key``, ``latents_sha256``)
    or ``latents_blob`` names the voice; ``latents_blob`` (safetensors bytes) is only used for
    voices that are in no registry (the uploads of the old ``/synthesize`` call)."""

    engine: str
    voice_name: str
    language: str
    pieces: tuple[str, ...]
    format: str
    rate: int
    speed: float
    seed: int
    repeatable: bool
    stream: bool
    model_sha256: str | None = None
    voice_language: str | None = None
    builtin: str | None = None
    latents_key: str | None = None
    latents_sha256: str | None = None
    latents_blob: bytes | None = field(default=None, repr=False)
    # The text front end's per-piece silence, speed factor and language (empty: the defaults).
    pauses: tuple[float | None, ...] = ()
    rates: tuple[float, ...] = ()
    languages: tuple[str, ...] = ()
    end_pause: float = 0.0
    # With timestamps: the level, and how the spoken words map back to the written ones (`word_map_values`).
    timestamps: str | None = None
    words: dict[str, Any] | None = None

    @property
    def multiplexed_id(self) -> str | None:
        """The ``multiplexed_model_id`` a preset's request is routed by: its blob sha256."""
        return self.latents_sha256 if self.latents_key else None

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        for name in ("pieces", "pauses", "rates", "languages"):
            raw[name] = list(raw[name])
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SynthesisJob:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        for name in ("pieces", "pauses", "rates", "languages"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)


def job_from_plan(plan: Any, latents_key: Callable[[str, str], str | None] = lambda name, sha: None) -> SynthesisJob:
    """Describe ``plan`` as plain values; ``latents_key(voice name, sha256)`` finds a preset's blob key."""
    voice = plan.voice
    builtin = voice.input.builtin
    key = sha = blob = None
    if builtin is None:
        sha = voice.voice_sha256
        key = latents_key(voice.name, sha) if sha else None
        if key is None:  # not in the registry: send the latents themselves
            from tts_gateway.voices.blobs import encode

            blob = encode(voice.input.latents or {})
            sha = hashlib.sha256(blob).hexdigest()
    return SynthesisJob(
        engine=plan.engine_name, voice_name=voice.name, language=plan.language, pieces=tuple(plan.pieces),
        format=plan.fmt.name, rate=plan.rate, speed=plan.speed, seed=plan.seed, repeatable=plan.repeatable,
        stream=plan.stream, model_sha256=plan.engine.model.sha256, voice_language=voice.language,
        builtin=builtin, latents_key=key, latents_sha256=sha, latents_blob=blob,
        pauses=tuple(plan.pauses), rates=tuple(plan.rates), languages=tuple(plan.languages), end_pause=plan.end_pause,
        timestamps=plan.timestamps, words=None if plan.words is None else word_map_values(plan.words),
    )


# -- timings: the word map out, timed audio back ------------------------------------------------------
def word_map_values(words: WordMap) -> dict[str, Any]:
    return {"written": list(words.written), "sentences": list(words.sentences), "piece_ends": list(words.piece_ends),
            "groups": [[g.first, g.end, g.spoken_first, g.spoken_end] for g in words.groups]}


def word_map_from_values(raw: Mapping[str, Any]) -> WordMap:
    return WordMap(written=tuple(raw["written"]), groups=tuple(Group(*map(int, g)) for g in raw["groups"]),
                   piece_ends=tuple(int(end) for end in raw["piece_ends"]), sentences=tuple(raw["sentences"]))


def timed_values(item: TimedBytes) -> dict[str, Any]:
    """A part of a timed answer as plain values (times unrounded: the gateway rounds as it answers)."""
    def spans(found: tuple[WordTiming, ...]) -> list[list[Any]]:
        return [[span.text, span.start, span.end] for span in found]

    return {"audio": item.audio, "words": spans(item.words), "sentences": spans(item.sentences),
            "duration": item.duration}


def timed_from_values(raw: Mapping[str, Any]) -> TimedBytes:
    def spans(key: str) -> tuple[WordTiming, ...]:
        return tuple(WordTiming(str(text), float(start), float(end)) for text, start, end in raw.get(key) or ())

    duration = raw.get("duration")
    return TimedBytes(bytes(raw["audio"]), spans("words"), spans("sentences"),
                      None if duration is None else float(duration))


# -- settings as plain values ---------------------------------------------------------------------
_NOT_SENT = {"api_keys", "host", "port"}  # the replica serves no HTTP; keys must not travel
_PATHS = {"data_dir", "xtts_checkpoint"}


def settings_values(settings: Settings) -> dict[str, Any]:
    """The settings a replica needs, as JSON-like values."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name in _NOT_SENT:
            continue
        value = getattr(settings, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def settings_from_values(values: Mapping[str, Any]) -> Settings:
    known = {f.name for f in fields(Settings)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            continue  # a newer gateway's setting this replica's code does not know
        if name in _PATHS and value is not None:
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    if "backend" in known:
        kwargs["backend"] = "local"  # a replica runs its engine in-process
    return Settings(**kwargs)


# -- errors across the process boundary -------------------------------------------------------------
class ReplicaError(Exception):
    """A `TTSGatewayError` raised on a replica, carried as its kind and plain values (it pickles by its
    args); `error` rebuilds the same kind on the gateway."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.values = values

    def __str__(self) -> str:
        return f"{self.values.get('kind')}: {self.values.get('detail')}"

    @classmethod
    def of(cls, exc: TTSGatewayError) -> ReplicaError:
        return cls(exc.to_dict())

    @property
    def error(self) -> TTSGatewayError:
        return TTSGatewayError.from_dict(self.values)


def replica_error(exc: BaseException | None) -> ReplicaError | None:
    """The `ReplicaError` in ``exc``'s chain of causes (Ray wraps what a replica raised), if any."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ReplicaError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None



def translate(exc: Exception, engine: str) -> TTSGatewayError:
    """Any failure of a remote call as the error of the same kind the edges understand."""
    remote = replica_error(exc)
    if remote is not None:
        return remote.error
    if isinstance(exc, TTSGatewayError):
        return exc
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return busy(engine, exc)
    log.error("Ray call to engine %s failed: %s: %s", engine, type(exc).__name__, exc)
    return Unavailable(f"engine {engine!r} failed on the Ray cluster: {type(exc).__name__}", retry_after=1)


def busy(engine: str, exc: Any) -> Unavailable:
    """A `BackPressureError` (every replica at its limit, the handle's queue full) as 503 + Retry-After."""
    retry = getattr(exc, "retry_after_s", None)
    seconds = max(1, math.ceil(retry)) if retry else BUSY_RETRY_AFTER_S
    return Unavailable(f"engine {engine!r} is busy: every replica is at its limit and the queue is full; "
                       f"retry shortly", retry_after=seconds, code="busy")
