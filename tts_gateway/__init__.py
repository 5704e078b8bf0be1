"""tts-gateway: a plugin-based, multi-engine text-to-speech gateway.

This module is the whole plugin API. An engine plugin is a module (or object) with a
``register_engines`` hook::

    from tts_gateway import BaseEngine, BuiltinVoice, hookimpl

    class Beep(BaseEngine):
        name, sample_rate, languages = "beep", 16000, ("en",)

        def voices(self):
            return [BuiltinVoice("one", "en")]

        def synthesize(self, text, voice, options):
            yield np.zeros(1600, np.float32)

    @hookimpl
    def register_engines(register, context):
        register(Beep())

Everything else in the package is internal.
"""

from tts_gateway.engines.base import (
    BaseEngine,
    BuiltinVoice,
    Capabilities,
    CloningEngine,
    EngineContext,
    EngineUnavailable,
    Latents,
    ModelInfo,
    SpeechEngine,
    SynthesisCancelled,
    SynthesisOptions,
    UnsupportedLanguage,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "BaseEngine",
    "BuiltinVoice",
    "Capabilities",
    "CloningEngine",
    "EngineContext",
    "EngineUnavailable",
    "Latents",
    "ModelInfo",
    "SpeechEngine",
    "SynthesisCancelled",
    "SynthesisOptions",
    "UnsupportedLanguage",
    "VoiceInput",
    "__version__",
    "hookimpl",
]
