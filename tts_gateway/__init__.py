"""tts-gateway: a plugin-based, multi-engine text-to-speech gateway.

This module is the whole plugin API. An engine plugin is a module (or object) with a
``register_engines`` hook::

    from tts_gateway import BaseEngine, BuiltinVoice, EngineContext, Register, hookimpl

    class Beep(BaseEngine):
        name, sample_rate, languages = "beep", 16000, ("en",)

        def voices(self):
            return [BuiltinVoice("one", "en")]

        def synthesize(self, text, voice, options):
            yield np.zeros(1600, np.float32)

    @hookimpl
    def register_engines(register: Register, context: EngineContext) -> None:
        register(Beep())  # context.options_for("beep"): its TTS_GATEWAY_ENGINE_BEEP_<KEY> variables

An engine with an optional feature implements its protocol (`CloningEngine`, `BlendingEngine`,
`LanguageNamingEngine`, `RetryHinting`, `TimingEngine`, `VoiceHintingEngine`); the gateway asks for it by that protocol.
Everything else in the package is internal.
"""

from tts_gateway.engines.base import (
    BaseEngine,
    BlendingEngine,
    BuiltinVoice,
    Capabilities,
    CloningEngine,
    EngineContext,
    EngineUnavailable,
    LanguageNamingEngine,
    Latents,
    ModelInfo,
    RetryHinting,
    SpeechEngine,
    SynthesisCancelled,
    SynthesisOptions,
    TimingEngine,
    UnsupportedLanguage,
    VoiceHintingEngine,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import Register, hookimpl
from tts_gateway.engines.timing import TimedChunk, WordTiming

__version__ = "0.1.0"

__all__ = [
    "BaseEngine",
    "BlendingEngine",
    "BuiltinVoice",
    "Capabilities",
    "CloningEngine",
    "EngineContext",
    "EngineUnavailable",
    "LanguageNamingEngine",
    "Latents",
    "ModelInfo",
    "Register",
    "RetryHinting",
    "SpeechEngine",
    "SynthesisCancelled",
    "SynthesisOptions",
    "TimedChunk",
    "TimingEngine",
    "UnsupportedLanguage",
    "VoiceHintingEngine",
    "VoiceInput",
    "WordTiming",
    "__version__",
    "hookimpl",
]
