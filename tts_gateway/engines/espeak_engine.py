"""espeak-ng (Debian package): 100+ languages, formant synthesis, voices ``espeak:<lang>``."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import numpy as np

from tts_gateway.audio import time_stretch
from tts_gateway.engines.base import (
    BaseEngine,
    BuiltinVoice,
    Capabilities,
    EngineUnavailable,
    ModelInfo,
    SynthesisCancelled,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.scheduling import shared_budget

BASE_WPM = 175
MIN_WPM, MAX_WPM = 80, 450
SAMPLE_RATE = 22050


def parse_voices(listing: str) -> list[tuple[str, str]]:
    """(language code, display name) pairs from ``espeak-ng --voices``."""
    voices = []
    for line in listing.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4:
            voices.append((parts[1].lower(), parts[3].replace("_", " ")))
    return voices


def wav_samples(data: bytes) -> np.ndarray:
    """PCM16 samples from espeak-ng's --stdout WAV, whose RIFF/data sizes are bogus (0x7FFFFFFF)."""
    index = data.find(b"data", 12)
    if data[:4] != b"RIFF" or index < 0:
        raise RuntimeError("espeak-ng did not return WAV data")
    payload = data[index + 8 :]
    payload = payload[: len(payload) - len(payload) % 2]
    return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0


class EspeakEngine(BaseEngine):
    name = "espeak"
    capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True)

    def __init__(self, binary: str | None = None) -> None:
        super().__init__()
        self.binary = binary or shutil.which("espeak-ng")
        self._budget = shared_budget()

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @cached_property
    def _voices(self) -> list[tuple[str, str]]:
        if not self.binary:
            return []
        try:
            out = subprocess.run([self.binary, "--voices"], capture_output=True, text=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return []
        seen: dict[str, str] = {}
        for code, display in parse_voices(out.stdout):
            seen.setdefault(code, display)
        # "en", "fr", "pt" … are what clients ask for; espeak-ng takes them as voice names too.
        for code, display in list(seen.items()):
            base = code.split("-")[0]
            if base != code and base not in seen:
                seen[base] = display.split("(")[0].strip()
        return sorted(seen.items())

    @property
    def languages(self) -> list[str]:
        return [code for code, _ in self._voices]

    @property
    def language_names(self) -> dict[str, str]:
        return dict(self._voices)

    @cached_property
    def _version(self) -> str:
        if not self.binary:
            return "espeak-ng"
        try:
            out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return "espeak-ng"
        return out.stdout.strip() or "espeak-ng"

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id=self._version.split(" Data")[0],
                         sha256=hashlib.sha256(self._version.encode()).hexdigest(), licence="GPL-3.0-or-later")

    def availability(self) -> tuple[bool, str | None]:
        if not self.binary:
            return False, "espeak-ng is not installed (Debian: apt-get install espeak-ng; `make` does this as root)"
        if not self._voices:
            return False, "espeak-ng is installed but lists no voices"
        return True, None

    def voices(self) -> list[BuiltinVoice]:
        return [BuiltinVoice(id=code, language=code, description=f"espeak-ng {display}", licence="GPL-3.0-or-later")
                for code, display in self._voices]

    def max_chars(self, language: str) -> int:
        return 1000

    def load(self) -> None:
        ok, reason = self.availability()
        if not ok:
            raise EngineUnavailable(self.name, reason or "unavailable")
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        self.check_language(options.language)
        language = options.language if voice.builtin in (None, options.language) else voice.builtin
        wanted = BASE_WPM * options.speed
        wpm = int(min(max(wanted, MIN_WPM), MAX_WPM))
        assert self.binary is not None
        with self._budget.slot(threads=1):  # espeak-ng uses one core; it waits for one like any engine call
            # Text goes through stdin, never argv, so nothing in it is parsed as an option.
            process = subprocess.Popen(
                [self.binary, "-v", str(language), "-s", str(wpm), "--stdout", "-b", "1", "--stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            try:
                out, err = process.communicate(text.encode("utf-8"), timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                raise RuntimeError("espeak-ng timed out") from None
        if options.cancel.is_set():
            raise SynthesisCancelled("cancelled")
        if process.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {err.decode(errors='replace').strip()[:200]}")
        samples = wav_samples(out)
        if wpm != wanted:  # beyond espeak's own range: stretch the rest
            samples = time_stretch(samples, SAMPLE_RATE, wanted / wpm)
        yield samples


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None]) -> None:
    register(EspeakEngine())
