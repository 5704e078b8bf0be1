"""VoiceCatalog: every voice the gateway can speak with — engines' built-ins and registered presets.

It resolves a voice name to what an engine needs (`ResolvedVoice`), lists and describes voices,
and registers and deletes presets. Registration runs the cloning engine's ``compute_latents``
through the registry, which stores the result once; nothing here knows of HTTP.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from tts_gateway.engines.base import (
    BlendingEngine,
    BuiltinVoice,
    CloningEngine,
    EngineUnavailable,
    SpeechEngine,
    VoiceInput,
    match_language,
)
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import Conflict, InvalidField, NotFound, Unavailable
from tts_gateway.text import has_control_chars
from tts_gateway.voices.audio import ReferenceAudio, prepare_reference
from tts_gateway.voices.names import NAME_RULE, valid_voice_name
from tts_gateway.voices.registry import VoiceBroken, VoiceExists, VoiceNotFound, VoiceRecord, VoiceRegistry

log = logging.getLogger(__name__)


@dataclass
class ResolvedVoice:
    """A voice ready for an engine: a built-in id, or verified latents of a preset or upload."""

    name: str
    engine: str
    input: VoiceInput
    language: str | None
    voice_sha256: str | None = None
    builtin: bool = True


def parse_blend(text: str, engine_name: str, known: set[str]) -> dict[str, float]:
    """``voice:weight,voice:weight`` → weights; `InvalidField` ("blend") naming what is wrong."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text[:2000].split(",")):
        if not part:
            continue
        voice, sep, raw = part.rpartition(":")
        if not sep:
            voice, raw = part, "1"
        if ":" in voice:  # "kokoro:jf_alpha:0.6": a voice of another engine is refused
            other, _, voice = voice.partition(":")
            if other != engine_name:
                raise InvalidField("blend", f"{other}:{voice} belongs to engine {other!r}; a blend mixes voices "
                                            f"of one engine ({engine_name!r})")
        if voice not in known:
            shown = ", ".join(sorted(known)[:20])
            raise InvalidField("blend", f"engine {engine_name!r} has no voice {voice[:60]!r}; it has: {shown}")
        try:
            weight = float(raw)
        except ValueError:
            raise InvalidField("blend", f"weight {raw[:20]!r} of {voice} is not a number") from None
        if not (0 < weight <= 100):  # also false for NaN
            raise InvalidField("blend", f"weight of {voice} must be a number above 0 (up to 100), got {raw[:20]}")
        if voice in weights:
            raise InvalidField("blend", f"{voice} appears twice")
        weights[voice] = weight
    if not weights:
        raise InvalidField("blend", "name at least one voice, e.g. jf_alpha:0.6,jf_nezumi:0.4")
    return weights


class VoiceCatalog:
    """Built-in voices (``engine:voice``) and presets (plain names, one engine each).

    Args:
        engines: The engine manager (built-in voices, cloning engines).
        registry: Where presets and their latents live.
        default_voice: The voice used when a request names none.
    """

    def __init__(self, engines: EngineManager, registry: VoiceRegistry, default_voice: str, *,
                 require_consent: bool = True) -> None:
        self.engines = engines
        self.registry = registry
        self.default_voice = default_voice
        self.require_consent = require_consent

    # -- resolving --------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ResolvedVoice:
        """What the engine needs to speak with ``name`` (the default voice when None)."""
        name = name if name is not None else self.default_voice
        if ":" in name:
            engine_name, _, voice_id = name.partition(":")
            if engine_name not in self.engines.names:
                raise NotFound(f"unknown voice {name[:80]!r}: no engine named {engine_name[:40]!r}",
                               code="unknown-voice")
            engine = self.engines.get(engine_name)
            builtin = {v.id: v for v in self.builtin_voices(engine)}.get(voice_id)
            if builtin is None:
                ok, reason = engine.availability()
                if not ok:  # its voices may exist once the model is there (e.g. XTTS still downloading)
                    raise EngineUnavailable(engine_name, reason or "not available")
                raise self.unknown(name)
            return ResolvedVoice(name, engine_name, VoiceInput(builtin=voice_id), builtin.language)
        if not valid_voice_name(name):
            raise self.unknown(name)
        try:
            record = self.registry.get(name)
        except VoiceNotFound:
            raise self.unknown(name) from None
        if record.engine not in self.engines.names:
            raise Unavailable(f"voice {name!r} needs engine {record.engine!r}, which is not enabled",
                              code="engine-not-enabled")
        engine = self.engines.get(record.engine)
        if record.status == "broken":
            raise VoiceBroken(name, record.extra.get("broken_reason", "latents failed verification"))
        model_sha = engine.model.sha256
        if model_sha and record.model_sha256 != model_sha:
            raise Conflict(
                f"voice {name!r} was registered on model {record.model_sha256[:12]}…, but engine "
                f"{record.engine!r} now runs {model_sha[:12]}…; register the voice again", code="model-changed"
            )
        latents = self.registry.latents(record)
        return ResolvedVoice(name, record.engine, VoiceInput(latents=latents), record.language,
                             record.voice_sha256, builtin=False)

    def unknown(self, name: str) -> VoiceNotFound:
        """`VoiceNotFound` for ``name``, with the nearest voice names as a hint (``joe`` → ``piper:joe``)."""
        error = VoiceNotFound(name[:80])
        names = [v["name"] for v in self.all(partial=True)]
        wanted = name[:80].lower()
        close = [n for n in names if n.partition(":")[2].lower() == wanted]
        close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6) if n not in close]
        if close:
            error.detail = f"{error.detail}; did you mean {', '.join(close[:3])}?"
        return error

    def builtin_voices(self, engine: SpeechEngine) -> list[BuiltinVoice]:
        try:
            return engine.voices()
        except Exception:  # a plugin's listing must not take the gateway down
            log.exception("engine %s failed to list voices", engine.name)
            return []

    def preset_engine(self, name: str) -> str | None:
        """The engine of preset ``name``, or None when there is no such preset."""
        try:
            return self.registry.get(name).engine
        except VoiceNotFound:
            return None

    # -- describing -------------------------------------------------------------------------------
    def all(self, *, partial: bool = False) -> list[dict[str, Any]]:
        """Built-in voices of available engines, then presets.

        While the registry is unavailable (see its ``health()``) this raises the registry's `Unavailable`
        (503): a list without the presets would read as if they had been deleted. ``partial=True`` lists the
        built-ins alone instead, for hints and for front doors that can only offer those meanwhile.
        """
        voices: list[dict[str, Any]] = []
        for engine_name in self.engines.names:
            engine = self.engines.get(engine_name)
            if not engine.availability()[0]:
                continue
            for v in self.builtin_voices(engine):
                voices.append({
                    "name": f"{engine_name}:{v.id}", "engine": engine_name, "kind": "builtin",
                    "language": v.language, "languages": list(v.languages) or ([v.language] if v.language else []),
                    "description": v.description, "licence": v.licence,
                    "read_only": True, "status": "ok",
                })
        try:
            presets = self.registry.records()
        except Unavailable as exc:  # a damaged index or an unreachable database: the built-ins still work
            if not partial:
                raise
            log.debug("voices listed without presets: %s", exc.detail)  # the registry has said why, once
            presets = []
        voices.extend(self.preset_json(r) for r in presets)
        return voices

    def describe(self, name: str) -> dict[str, Any]:
        if ":" in name:
            resolved = self.resolve(name)
            return next(v for v in self.all(partial=True) if v["name"] == resolved.name)
        return self.preset_json(self.registry.get(name))

    @staticmethod
    def preset_json(record: VoiceRecord) -> dict[str, Any]:
        return {
            "name": record.name, "engine": record.engine, "kind": "preset", "language": record.language,
            "description": record.description, "consent": record.consent, "licence": record.licence,
            "read_only": False, "status": record.status, "created_at": record.created_at,
            "duration": record.duration, "audio_sha256": record.audio_sha256,
            "clip_sha256s": record.clip_sha256s, "voice_sha256": record.voice_sha256,
            "model": {"id": record.model_id, "sha256": record.model_sha256},
            "blend": record.extra.get("blend"),
        }

    # -- writing ----------------------------------------------------------------------------------
    def delete(self, name: str) -> None:
        if ":" in name:
            self.resolve(name)  # 404 for unknown built-ins, else read-only
            raise Conflict(f"{name!r} is a built-in voice and cannot be deleted", code="read-only")
        self.registry.delete(name)

    def register(
        self,
        name: str,
        files: list[tuple[str, bytes]],
        *,
        engine_name: str = "xtts",
        language: str | None = None,
        description: str = "",
        consent: bool = False,
    ) -> dict[str, Any]:
        """Register a preset from reference clips: latents computed once and stored."""
        if not valid_voice_name(name):
            raise InvalidField("name", NAME_RULE)
        if self.require_consent and not consent:  # as hosted cloning services do: no clone without a yes
            raise InvalidField("consent", "must be true: confirm that the speaker agreed to have their voice cloned "
                                          "(TTS_GATEWAY_REQUIRE_CONSENT=0 turns this check off)",
                               code="consent-required")
        if self.registry.exists(name):
            raise VoiceExists(name)
        if has_control_chars(description) or (language and has_control_chars(language)):
            raise InvalidField("description", "contains control characters")
        engine = self.cloning_engine(engine_name, field_name="engine")
        if language is not None:
            language = match_language(engine, language)
        reference = prepare_reference(files, engine.reference_sample_rate)
        with self.engines.use(engine_name) as loaded:
            cloning: CloningEngine = loaded  # type: ignore[assignment]
            model = cloning.model
            record = self.registry.create(
                name, engine=engine_name, reference=reference, compute=cloning.compute_latents,
                model_id=model.id, model_sha256=model.sha256 or "", licence=model.licence,
                language=language, description=description, consent=consent,
            )
        return self.preset_json(record)

    def register_blend(
        self,
        name: str,
        blend: str,
        *,
        engine_name: str,
        language: str | None = None,
        description: str = "",
    ) -> dict[str, Any]:
        """Register a preset mixed from built-in voices, e.g. ``jf_alpha:0.6,jf_nezumi:0.4``.

        The mixed latents are stored like a clone's (content-addressed, verified, no pickle) and
        the recipe is kept in the record; the same recipe always gives the same latents.
        """
        if not valid_voice_name(name):
            raise InvalidField("name", NAME_RULE)
        if self.registry.exists(name):
            raise VoiceExists(name)
        engine = self.engines.get(engine_name)
        if not isinstance(engine, BlendingEngine):
            raise InvalidField("blend", f"engine {engine_name!r} cannot blend voices")
        self.engines.check_available(engine_name)
        weights = parse_blend(blend, engine_name, {v.id for v in self.builtin_voices(engine)})
        if language is not None:
            language = match_language(engine, language)
        if has_control_chars(description):
            raise InvalidField("description", "contains control characters")
        total = sum(weights.values())
        weights = {voice: round(weight / total, 6) for voice, weight in sorted(weights.items())}  # one recipe
        recipe = ",".join(f"{voice}:{weight:g}" for voice, weight in weights.items())
        latents = engine.blend_latents(weights)
        model = engine.model
        # The recipe stands in for reference audio: the same recipe is the same voice.
        reference = ReferenceAudio(np.zeros(0, np.float32), 1, hashlib.sha256(f"blend\0{recipe}".encode()).hexdigest(),
                                   ())
        record = self.registry.create(
            name, engine=engine_name, reference=reference, compute=lambda _samples: latents,
            model_id=model.id, model_sha256=model.sha256 or "", licence=model.licence,
            language=language or next(iter(engine.languages), None), description=description, consent=True,
            extra={"blend": recipe},
        )
        return self.preset_json(record)

    def condition_upload(self, files: list[tuple[str, bytes]], engine_name: str = "xtts") -> ResolvedVoice:
        """Latents for uploaded audio via the registry's upload cache (the old ``/synthesize`` call)."""
        engine = self.cloning_engine(engine_name, field_name=None)
        reference = prepare_reference(files, engine.reference_sample_rate)
        with self.engines.use(engine_name) as loaded:
            cloning: CloningEngine = loaded  # type: ignore[assignment]
            _key, sha, latents = self.registry.condition(
                reference, engine_name, cloning.model.sha256 or "", cloning.compute_latents
            )
        return ResolvedVoice(f"upload:{reference.sha256[:12]}", engine_name, VoiceInput(latents=latents),
                             None, sha, builtin=False)

    def cloning_engine(self, engine_name: str, field_name: str | None) -> CloningEngine:
        """The available cloning engine ``engine_name``; `InvalidField` (or `Unavailable`) otherwise."""
        engine = self.engines.get(engine_name)
        if not isinstance(engine, CloningEngine):
            detail = f"engine {engine_name!r} cannot clone voices"
            if field_name is None:
                raise Unavailable(detail, code="not-cloning")
            raise InvalidField(field_name, detail)
        self.engines.check_available(engine_name)
        return engine

