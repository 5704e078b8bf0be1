"""The ``info`` answer to ``describe``: one TTS program listing every usable voice, read fresh each time.

Home Assistant shows a voice's ``description`` as its name in the voice picker and filters voices by
``languages``; it only offers voices marked ``installed``.
"""

from __future__ import annotations

from typing import Any

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from tts_gateway import __version__
from tts_gateway.core.compose import Core

PROGRAM = "tts-gateway"
# Where the built-in engines come from (a plugin's engine gets no link).
ENGINE_URLS = {
    "piper": "https://github.com/OHF-Voice/piper1-gpl",
    "espeak": "https://github.com/espeak-ng/espeak-ng",
    "xtts": "https://github.com/idiap/coqui-ai-TTS",
    "kokoro": "https://github.com/thewh1teagle/kokoro-onnx",
}


def voice_languages(core: Core, voice: dict[str, Any]) -> list[str]:
    """A built-in voice speaks its own language; a preset its own first, then every other of its engine's."""
    own = voice.get("language")
    if voice["kind"] == "builtin":
        return list(voice.get("languages") or []) or list(core.engines.get(voice["engine"]).languages)
    languages = [own] if own else []
    languages += [code for code in core.engines.get(voice["engine"]).languages if code != own]
    return languages


def usable_voices(core: Core) -> list[dict[str, Any]]:
    """Voices a synthesis can use now: built-ins of available engines and intact presets of available engines."""
    available: dict[str, bool] = {}

    def engine_ok(name: str) -> bool:
        if name not in available:
            available[name] = name in core.engines.names and core.engines.get(name).availability()[0]
        return available[name]

    # While the registry is unavailable the presets cannot speak, so the built-ins alone are what can.
    return [v for v in core.voices.all(partial=True) if v.get("status") == "ok" and engine_ok(v["engine"])]


def tts_voice(core: Core, voice: dict[str, Any]) -> TtsVoice:
    engine = voice["engine"]
    licence = voice.get("licence") or "unknown"
    if voice["kind"] == "builtin":
        description = voice.get("description") or voice["name"]
        version = None
    else:
        extra = voice.get("description") or f"voice preset ({engine})"
        description = f"{voice['name']}: {extra}"
        version = (voice.get("voice_sha256") or "")[:12] or None
    return TtsVoice(
        name=voice["name"],
        description=description,
        attribution=Attribution(name=f"{engine} · licence {licence}", url=ENGINE_URLS.get(engine, "")),
        installed=True,
        version=version,
        languages=voice_languages(core, voice),
        speakers=None,
    )


def build_info(core: Core) -> Info:
    """Read the catalog now (presets come and go while the server runs); blocking, so call it in a thread."""
    usable = usable_voices(core)
    engines = sorted({v["engine"] for v in usable})
    program = TtsProgram(
        name=PROGRAM,
        description=f"tts-gateway: {', '.join(engines) or 'no engine available'}",
        attribution=Attribution(name="tts-gateway", url=""),
        installed=True,
        version=__version__,
        voices=[tts_voice(core, v) for v in usable],
        supports_synthesize_streaming=True,
    )
    return Info(tts=[program])
