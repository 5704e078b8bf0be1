"""A minimal tts-gateway engine plugin: speaks every character as a short tone.

Install it (``pip install examples/hello_engine``) and the gateway finds it through the
``tts_gateway`` entry-point group; or name the module in ``TTS_GATEWAY_PLUGINS=hello_engine``.
"""

from collections.abc import Iterator

import numpy as np

from tts_gateway import BaseEngine, BuiltinVoice, Capabilities, Register, SynthesisOptions, VoiceInput, hookimpl


class HelloEngine(BaseEngine):
    name = "hello"
    capabilities = Capabilities(streaming=True, deterministic=True)
    sample_rate = 16000
    languages = ("en",)

    def voices(self) -> list[BuiltinVoice]:
        return [BuiltinVoice("tone", "en", "A sine tone per character", licence="CC0-1.0")]

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        t = np.arange(int(self.sample_rate * 0.08)) / self.sample_rate
        for char in text:
            frequency = 0.0 if char.isspace() else 220.0 + 10.0 * (ord(char) % 64)
            yield (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@hookimpl
def register_engines(register: Register) -> None:
    register(HelloEngine())
