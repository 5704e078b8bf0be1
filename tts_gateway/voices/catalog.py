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
    SpeechEngine,
    VoiceHintingEngine,
    VoiceInput,
    match_language,
)
from tts_gateway.engines.manager import EngineManager, unavailable
from tts_gateway.errors import Conflict, InvalidField, Unavailable
from tts_gateway.languages import codes_named
from tts_gateway.text import has_control_chars
from tts_gateway.voices.audio import ReferenceAudio, prepare_reference
from tts_gateway.voices.names import NAME_RULE, valid_voice_name
from tts_gateway.voices.registry import VoiceBroken, VoiceExists, VoiceNotFound, VoiceRecord, VoiceRegistry

log = logging.getLogger(__name__)

# A description is returned in every listing of every voice: bounded so one preset cannot make them large.
MAX_DESCRIPTION_CHARS = 1000


def check_description(description: str) -> None:
    """`InvalidField` ("description") for one too long or holding control characters."""
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidField("description", f"must be at most {MAX_DESCRIPTION_CHARS} characters, "
                                          f"not {len(description)}")
    if has_control_chars(description):
        raise InvalidField("description", "contains control characters")


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


def suggest_voices(typed: str, voices: list[dict[str, Any]], *, fuzzy: bool = True, most: int = 3) -> list[str]:
    """Names among ``voices`` that ``typed`` (lower-case, without an engine) probably meant, best first:
    the same name in any case, then voices of the language it names (``german`` → ``espeak:de``); close
    spellings only when neither matched (and ``fuzzy``)."""
    def own(voice: dict[str, Any]) -> str:
        return str(voice["name"]).partition(":")[2] or str(voice["name"])

    found = [v["name"] for v in voices if own(v).lower() == typed or str(v["name"]).lower() == typed]
    codes = codes_named(typed)
    speakers = [v for v in voices if any(str(v.get("language") or "").split("-")[0] == code
                                         or v.get("language") == code for code in codes)]
    found += [v["name"] for v in sorted(speakers, key=lambda v: own(v) not in codes)]  # espeak:de before others
    if fuzzy and not found:
        by_own = {own(v).lower(): v["name"] for v in voices}
        found += [by_own[n] for n in difflib.get_close_matches(typed, list(by_own), n=most, cutoff=0.6)]
    return list(dict.fromkeys(found))[:most]


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
                raise self.unknown(name)
            engine = self.engines.get(engine_name)
            builtin = {v.id: v for v in self.builtin_voices(engine)}.get(voice_id)
            if builtin is None:
                ok, reason = engine.availability()
                if not ok:  # its voices may exist once the model is there (e.g. XTTS still downloading)
                    raise unavailable(engine, reason)
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
        """`VoiceNotFound` for ``name`` with what the caller probably meant: ``joe`` → ``piper:joe``,
        ``Piper:Joe`` → ``piper:joe``, ``espek:de`` → ``espeak:de``, ``espeak:german`` → ``espeak:de``,
        and the engine's own word on a voice it lacks (``kokoro:af_heart``: which files bring it)."""
        name = name[:80]
        error = VoiceNotFound(name)
        engine_part, colon, voice_part = name.lower().partition(":")
        if not colon:
            engine_part, voice_part = "", engine_part
        voices = self.all(partial=True)
        engine_name: str | None = None
        if colon:
            engine_name = self.nearest_engine(engine_part)
            typed_engine = name.partition(":")[0]
            if typed_engine not in self.engines.names:
                engines = ", ".join(self.engines.names) or "none"
                error.detail = f"unknown voice {name!r}: no engine named {typed_engine[:40]!r} (engines: {engines})"
            voices = [v for v in voices if v["engine"] == engine_name]
        note = None
        if engine_name is not None:
            engine = self.engines.get(engine_name)
            if isinstance(engine, VoiceHintingEngine):
                note = engine.missing_voice_hint(voice_part)
        close = suggest_voices(voice_part, voices, fuzzy=note is None)
        if name.lower() in close:
            error.detail = f"unknown voice {name!r}: voice and engine names are lower-case"
        if note:
            error.detail = f"{error.detail}; {note}"
        if close:
            error.detail = f"{error.detail}; did you mean {', '.join(close)}?"
        return error

    def nearest_engine(self, typed: str) -> str | None:
        """The enabled engine ``typed`` most likely names: itself in any case, else the closest spelling."""
        names = list(self.engines.names)
        found = [n for n in names if n.lower() == typed] or difflib.get_close_matches(typed, names, n=1, cutoff=0.6)
        return found[0] if found else None

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
        check_description(description)
        if self.require_consent and not consent:  # as hosted cloning services do: no clone without a yes
            raise InvalidField("consent", "must be true: confirm that the speaker agreed to have their voice cloned "
                                          "(TTS_GATEWAY_REQUIRE_CONSENT=0 turns this check off)",
                               code="consent-required")
        if self.registry.exists(name):
            raise VoiceExists(name)
        if language and has_control_chars(language):
            raise InvalidField("language", "contains control characters")
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
        check_description(description)
        if self.registry.exists(name):
            raise VoiceExists(name)
        engine = self.engines.get(engine_name)
        if not isinstance(engine, BlendingEngine):
            raise InvalidField("blend", f"engine {engine_name!r} cannot blend voices")
        self.engines.check_available(engine_name)
        weights = parse_blend(blend, engine_name, {v.id for v in self.builtin_voices(engine)})
        if language is not None:
            language = match_language(engine, language)
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

