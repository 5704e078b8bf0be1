"""The synthesis service: voices → engines → sentences → resampled, encoded bytes.

Framework-free: the gateway validates HTTP input, then calls `plan` (cheap, raises domain errors)
and runs `run` in a worker thread. Nothing here imports Litestar or model code.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config import Settings
from config.settings import VOICE_NAME_RE
from engines.base import (
    CloningEngine,
    EngineUnavailable,
    SpeechEngine,
    SynthesisCancelled,
    SynthesisOptions,
    VoiceInput,
)
from engines.manager import EngineManager, UnknownEngine
from tts_gateway.audio import FORMATS, AudioFormat, Encoder, Resampler, media_type, silence, time_stretch
from tts_gateway.errors import Conflict, GatewayError, InvalidField, NotFound, Unavailable
from tts_gateway.metrics import Metrics
from tts_gateway.text import char_count, has_control_chars, normalise, split_sentences
from voices import (
    VoiceBroken,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceRegistry,
    prepare_reference,
)

log = logging.getLogger(__name__)

SENTENCE_PAUSE_S = 0.2
MIN_RATE, MAX_RATE = 8000, 48000
MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_SEED = 2**32 - 1


@dataclass
class SynthesisRequest:
    text: str
    voice: str | None = None
    language: str | None = None
    format: str = "wav"
    sample_rate: int | None = None
    speed: float = 1.0
    seed: int | None = None
    stream: bool = False
    cache: bool = True


@dataclass
class ResolvedVoice:
    name: str
    engine: str
    input: VoiceInput
    language: str | None
    voice_sha256: str | None = None
    builtin: bool = True


@dataclass
class Plan:
    engine_name: str
    engine: SpeechEngine
    voice: ResolvedVoice
    language: str
    pieces: list[str]
    fmt: AudioFormat
    rate: int
    speed: float
    seed: int
    repeatable: bool
    stream: bool
    text: str = ""
    cache: bool = True
    started: float = field(default_factory=time.perf_counter)

    @property
    def streams(self) -> bool:
        """Whether bytes really leave before the end (FLAC and MP3 are always sent whole)."""
        return self.stream and self.fmt.incremental

    def cache_parts(self) -> dict[str, Any] | None:
        """Everything that changes the bytes, or None when the result is not repeatable."""
        deterministic = self.engine.capabilities.deterministic
        if not self.cache or not (self.repeatable or deterministic):
            return None
        model = self.engine.model
        return {
            "v": 1, "engine": self.engine_name, "model": model.sha256 or model.id,
            "voice": self.voice.voice_sha256 or self.voice.name, "text": normalise(self.text),
            "language": self.language, "format": self.fmt.name, "rate": self.rate, "speed": self.speed,
            "seed": None if deterministic else self.seed, "stream": self.streams,
        }

    @property
    def media_type(self) -> str:
        return media_type(self.fmt, self.rate)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Engine": self.engine_name,
            "X-Voice": self.voice.name,
            "X-Seed": str(self.seed),
            "X-Sample-Rate": str(self.rate),
        }
        sha = self.engine.model.sha256
        if sha:
            headers["X-Model-Sha256"] = sha
        if self.voice.voice_sha256:
            headers["X-Voice-Sha256"] = self.voice.voice_sha256
        return headers


class SynthesisService:
    def __init__(
        self, settings: Settings, engines: EngineManager, registry: VoiceRegistry, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engines = engines
        self.registry = registry
        self.metrics = metrics

    # -- voices ---------------------------------------------------------------------------------
    def resolve_voice(self, name: str | None) -> ResolvedVoice:
        name = name if name is not None else self.settings.default_voice
        if ":" in name:
            engine_name, _, voice_id = name.partition(":")
            try:
                engine = self.engines.get(engine_name)
            except UnknownEngine:
                raise NotFound(f"unknown voice {name!r}: no engine named {engine_name!r}") from None
            builtin = {v.id: v for v in self._builtin_voices(engine)}.get(voice_id)
            if builtin is None:
                raise NotFound(f"unknown voice {name!r}; GET /v1/voices lists the voices")
            return ResolvedVoice(name, engine_name, VoiceInput(builtin=voice_id), builtin.language)
        if not VOICE_NAME_RE.fullmatch(name):
            raise NotFound(f"unknown voice {name!r}; GET /v1/voices lists the voices")
        try:
            record = self.registry.get(name)
        except VoiceNotFound:
            raise NotFound(f"unknown voice {name!r}; GET /v1/voices lists the voices") from None
        try:
            engine = self.engines.get(record.engine)
        except UnknownEngine:
            raise Unavailable(f"voice {name!r} needs engine {record.engine!r}, which is not enabled") from None
        if record.status == "broken":
            raise Conflict(str(VoiceBroken(name, record.extra.get("broken_reason", "latents failed verification"))))
        model_sha = engine.model.sha256
        if model_sha and record.model_sha256 != model_sha:
            raise Conflict(
                f"voice {name!r} was registered on model {record.model_sha256[:12]}…, but engine "
                f"{record.engine!r} now runs {model_sha[:12]}…; register the voice again"
            )
        try:
            latents = self.registry.latents(record)
        except VoiceBroken as exc:
            raise Conflict(str(exc)) from None
        return ResolvedVoice(
            name, record.engine, VoiceInput(latents=latents), record.language, record.voice_sha256, builtin=False
        )

    def _builtin_voices(self, engine: SpeechEngine) -> list[Any]:
        try:
            return engine.voices()
        except Exception:  # a plugin's listing must not take the gateway down
            log.exception("engine %s failed to list voices", engine.name)
            return []

    def list_voices(self) -> list[dict[str, Any]]:
        voices: list[dict[str, Any]] = []
        for engine_name in self.engines.names:
            engine = self.engines.get(engine_name)
            if not engine.availability()[0]:
                continue
            for v in self._builtin_voices(engine):
                voices.append({
                    "name": f"{engine_name}:{v.id}", "engine": engine_name, "kind": "builtin",
                    "language": v.language, "description": v.description, "licence": v.licence,
                    "read_only": True, "status": "ok",
                })
        voices.extend(self.voice_json(r) for r in self.registry.records())
        return voices

    def get_voice(self, name: str) -> dict[str, Any]:
        if ":" in name:
            resolved = self.resolve_voice(name)
            return next(v for v in self.list_voices() if v["name"] == resolved.name)
        try:
            return self.voice_json(self.registry.get(name))
        except VoiceNotFound:
            raise NotFound(f"unknown voice {name!r}") from None

    @staticmethod
    def voice_json(record: VoiceRecord) -> dict[str, Any]:
        return {
            "name": record.name, "engine": record.engine, "kind": "preset", "language": record.language,
            "description": record.description, "consent": record.consent, "licence": record.licence,
            "read_only": False, "status": record.status, "created_at": record.created_at,
            "duration": record.duration, "audio_sha256": record.audio_sha256,
            "clip_sha256s": record.clip_sha256s, "voice_sha256": record.voice_sha256,
            "model": {"id": record.model_id, "sha256": record.model_sha256},
        }

    def delete_voice(self, name: str) -> None:
        if ":" in name:
            self.resolve_voice(name)  # 404 for unknown built-ins, else read-only
            raise Conflict(f"{name!r} is a built-in voice and cannot be deleted")
        try:
            self.registry.delete(name)
        except VoiceNotFound:
            raise NotFound(f"unknown voice {name!r}") from None

    def register_voice(
        self,
        name: str,
        files: list[tuple[str, bytes]],
        *,
        engine_name: str = "xtts",
        language: str | None = None,
        description: str = "",
        consent: bool = False,
    ) -> dict[str, Any]:
        if not VOICE_NAME_RE.fullmatch(name):
            raise InvalidField("name", "must match ^[a-z0-9][a-z0-9_-]{0,63}$ (lower-case letters, digits, - and _)")
        if self.registry.exists(name):
            raise Conflict(str(VoiceExists(name)))
        if has_control_chars(description) or (language and has_control_chars(language)):
            raise InvalidField("description", "contains control characters")
        engine = self._engine(engine_name, field_name="engine")
        if not isinstance(engine, CloningEngine):
            raise InvalidField("engine", f"engine {engine_name!r} cannot clone voices")
        self._check_available(engine_name, engine)
        if language is not None:
            language = self._language(engine, language)
        reference = prepare_reference(files, engine.reference_sample_rate)
        with self.engines.use(engine_name) as loaded:
            cloning: CloningEngine = loaded  # type: ignore[assignment]
            model = cloning.model
            try:
                record = self.registry.create(
                    name, engine=engine_name, reference=reference, compute=cloning.compute_latents,
                    model_id=model.id, model_sha256=model.sha256 or "", licence=model.licence,
                    language=language, description=description, consent=consent,
                )
            except VoiceExists as exc:
                raise Conflict(str(exc)) from None
        return self.voice_json(record)

    def condition_upload(self, files: list[tuple[str, bytes]], engine_name: str = "xtts") -> ResolvedVoice:
        """Latents for uploaded audio via the upload cache (the old ``/synthesize`` call)."""
        engine = self._engine(engine_name, field_name="engine")
        if not isinstance(engine, CloningEngine):
            raise Unavailable(f"engine {engine_name!r} cannot clone voices")
        self._check_available(engine_name, engine)
        reference = prepare_reference(files, engine.reference_sample_rate)
        with self.engines.use(engine_name) as loaded:
            cloning: CloningEngine = loaded  # type: ignore[assignment]
            _key, sha, latents = self.registry.condition(
                reference, engine_name, cloning.model.sha256 or "", cloning.compute_latents
            )
        return ResolvedVoice(f"upload:{reference.sha256[:12]}", engine_name, VoiceInput(latents=latents),
                             None, sha, builtin=False)

    # -- engines & languages ----------------------------------------------------------------------
    def _engine(self, name: str, field_name: str = "engine") -> SpeechEngine:
        try:
            return self.engines.get(name)
        except UnknownEngine:
            raise NotFound(f"unknown engine {name!r}; known engines: {', '.join(self.engines.names)}") from None

    def _check_available(self, name: str, engine: SpeechEngine) -> None:
        ok, reason = engine.availability()
        if not ok:
            raise Unavailable(f"engine {name!r} is unavailable: {reason}", retry_after=30)

    @staticmethod
    def _language(engine: SpeechEngine, language: str) -> str:
        wanted = language.strip().lower().replace("_", "-")
        available = list(engine.languages)
        if wanted in available:
            return wanted
        base = wanted.split("-")[0]
        if base in available:
            return base
        same_base = [code for code in available if code.split("-")[0] == base]
        if len(same_base) == 1:
            return same_base[0]
        shown = ", ".join(available[:60]) + (" …" if len(available) > 60 else "")
        raise InvalidField("language", f"engine {engine.name!r} does not speak {language!r}; it has: {shown}")

    # -- synthesis ------------------------------------------------------------------------------
    def check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidField("text", "must not be empty")
        count = char_count(text)
        if count > self.settings.max_text_chars:
            limit = self.settings.max_text_chars
            raise InvalidField("text", f"is {count} characters; the limit is {limit} (TTS_GATEWAY_MAX_TEXT_CHARS)")
        if has_control_chars(text):
            raise InvalidField("text", "contains control characters")

    def check_options(self, fmt: str, sample_rate: int | None, speed: float, seed: int | None) -> AudioFormat:
        audio_format = FORMATS.get(fmt)
        if audio_format is None:
            raise InvalidField("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        if sample_rate is not None:
            if not MIN_RATE <= sample_rate <= MAX_RATE:
                raise InvalidField("sample_rate", f"must be between {MIN_RATE} and {MAX_RATE}, got {sample_rate}")
            problem = audio_format.check_rate(sample_rate)
            if problem:
                raise InvalidField("sample_rate", problem)
        if not (MIN_SPEED <= speed <= MAX_SPEED):  # also false for NaN
            raise InvalidField("speed", f"must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidField("seed", f"must be between 0 and {MAX_SEED}")
        return audio_format

    def plan(self, request: SynthesisRequest, voice: ResolvedVoice | None = None) -> Plan:
        """Validate everything that can be checked before work starts; raises domain errors."""
        self.check_text(request.text)
        audio_format = self.check_options(request.format, request.sample_rate, request.speed, request.seed)
        resolved = voice or self.resolve_voice(request.voice)
        engine = self._engine(resolved.engine)
        self._check_available(resolved.engine, engine)
        language = self._language(engine, request.language or resolved.language or engine.languages[0])
        rate = request.sample_rate or audio_format.default_rate(engine.sample_rate)
        pieces = split_sentences(request.text, language, engine.max_chars(language))
        if not pieces:
            raise InvalidField("text", "has nothing to speak")
        return Plan(
            engine_name=resolved.engine, engine=engine, voice=resolved, language=language, pieces=pieces,
            fmt=audio_format, rate=rate, speed=request.speed,
            seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
            repeatable=request.seed is not None, stream=request.stream, text=request.text, cache=request.cache,
        )

    def run(self, plan: Plan, cancel: Any, on_piece: Any = None) -> Iterator[bytes]:
        """Synthesize piece by piece, yielding encoded bytes as they are ready (worker thread)."""
        encoder = Encoder(plan.fmt, plan.rate, streaming=plan.stream)
        started = time.perf_counter()
        produced = 0
        first = True
        try:
            with self.engines.use(plan.engine_name) as engine:
                native_speed = engine.capabilities.native_speed
                options = SynthesisOptions(
                    language=plan.language, speed=plan.speed if native_speed else 1.0, seed=plan.seed,
                    cancel=cancel, repeatable=plan.repeatable, streaming=plan.stream,
                )
                resample = Resampler(engine.sample_rate, plan.rate)
                for index, piece in enumerate(plan.pieces):
                    if cancel.is_set():
                        raise SynthesisCancelled("cancelled")
                    pending: list[np.ndarray] = []
                    if index:
                        pending.append(silence(engine.sample_rate, SENTENCE_PAUSE_S))
                    for chunk in engine.synthesize(piece, plan.voice.input, options):
                        if cancel.is_set():
                            raise SynthesisCancelled("cancelled")
                        if native_speed:
                            pending.append(chunk)
                            produced += sum(p.size for p in pending)
                            out = encoder.feed(resample(np.concatenate(pending)))
                            pending = []
                            if out:
                                if first:
                                    self.metrics.ttfa.labels(plan.engine_name).observe(
                                        time.perf_counter() - plan.started)
                                    first = False
                                yield out
                        else:
                            pending.append(chunk)
                    if on_piece is not None:
                        on_piece(index + 1)
                    if pending:
                        block = np.concatenate(pending)
                        if not native_speed:
                            block = time_stretch(block, engine.sample_rate, plan.speed)
                        produced += block.size
                        out = encoder.feed(resample(block))
                        if out:
                            if first:
                                self.metrics.ttfa.labels(plan.engine_name).observe(time.perf_counter() - plan.started)
                                first = False
                            yield out
                tail = encoder.feed(resample(np.zeros(0, np.float32), last=True)) + encoder.close()
                if first:
                    self.metrics.ttfa.labels(plan.engine_name).observe(time.perf_counter() - plan.started)
                elapsed = time.perf_counter() - started
                seconds = produced / engine.sample_rate
                self.metrics.synthesis_seconds.labels(plan.engine_name).observe(elapsed)
                self.metrics.audio_seconds.labels(plan.engine_name).inc(seconds)
                if seconds > 0:
                    self.metrics.rtf.labels(plan.engine_name).observe(elapsed / seconds)
                if tail:
                    yield tail
        except EngineUnavailable as exc:
            raise Unavailable(str(exc), retry_after=30) from None
        except (GatewayError, SynthesisCancelled):
            raise
        except Exception as exc:
            # An engine fault fails this request only; the engine stays registered for the next.
            log.exception("engine %s failed during synthesis", plan.engine_name)
            raise Unavailable(f"engine {plan.engine_name!r} failed during synthesis: {type(exc).__name__}",
                              retry_after=1) from None
        finally:
            encoder.abort()

    def synthesize_bytes(self, plan: Plan, cancel: Any) -> bytes:
        return b"".join(self.run(plan, cancel))
