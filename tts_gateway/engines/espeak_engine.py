"""espeak-ng (Debian package): 100+ languages, formant synthesis, voices ``espeak:<lang>``."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import numpy as np
import soxr

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
from tts_gateway.engines.espeak_library import EspeakLibrary, library_path
from tts_gateway.engines.espeak_phonemes import espeak_text
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.scheduling import shared_budget
from tts_gateway.engines.timing import InputWord, TimedChunk, WordClock, input_words, scaled

BASE_WPM = 175
MIN_WPM, MAX_WPM = 80, 450
# From 450 wpm on, espeak-ng speeds speech up after stamping its events (sonic), unevenly: timed
# speech stays below and a time stretch makes the rest, which moves every word in proportion.
TIMED_MAX_WPM = 440
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
    # IPA in ``[[ … ]]`` is turned into espeak-ng's own phoneme names (`espeak_phonemes`), which it reads inline.
    capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True, phonemes=True)

    def __init__(self, binary: str | None = None) -> None:
        super().__init__()
        self.binary = binary or shutil.which("espeak-ng")
        self._budget = shared_budget()
        self._espeak: EspeakLibrary | None = None  # loaded at the first timed request
        self._library_lock = threading.Lock()

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
        text = espeak_text(text, str(language))
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

    def synthesize_timed(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[TimedChunk]:
        """Through libespeak-ng, whose word events say where each word's sound starts."""
        self.check_language(options.language)
        language = options.language if voice.builtin in (None, options.language) else voice.builtin
        wanted = BASE_WPM * options.speed
        wpm = int(min(max(wanted, MIN_WPM), TIMED_MAX_WPM))
        library = self._library()
        given = espeak_text(text, str(language))
        with self._budget.slot(threads=1):
            spoken = library.speak(given, str(language), wpm)
        if options.cancel.is_set():
            raise SynthesisCancelled("cancelled")
        words = input_words(given)  # the events count characters of what espeak-ng was given
        named = [word.text for word in input_words(text)]  # the words as the engine was asked to say them
        if len(named) != len(words):
            named = [word.text for word in words]
        labels, lengths = event_units(words, spoken.words, spoken.clause_ends, spoken.audio.size)
        timings = WordClock(named).chunk(labels, lengths, library.sample_rate, last=True)
        samples = spoken.audio
        if library.sample_rate != SAMPLE_RATE:
            samples = soxr.resample(samples, library.sample_rate, SAMPLE_RATE)
        stretched = time_stretch(samples, SAMPLE_RATE, wanted / wpm) if wpm != wanted else samples
        yield TimedChunk(stretched, scaled(timings, stretched.size / max(samples.size, 1)))

    def _library(self) -> EspeakLibrary:
        with self._library_lock:
            if self._espeak is None:
                path = library_path(self.binary) if self.binary else None
                if path is None:
                    raise EngineUnavailable(self.name, "libespeak-ng (the library espeak-ng runs with) was not found; "
                                            "word timings need it")
                self._espeak = EspeakLibrary(path)
            return self._espeak


def event_units(words: list[InputWord], events: list[tuple[int, int]], clause_ends: list[int],
                total: int) -> tuple[list[int | None], list[int]]:
    """espeak-ng's events as units for `WordClock`: from each word event (character, sample) to the
    next event, labelled with the input word at or after that character; None from the start and
    from each clause end (a pause). Labels never go back, so words stay in order."""
    marks: dict[int, int | None] = {sample: None for sample in clause_ends if 0 <= sample < total}
    highest = -1
    for character, sample in sorted(events, key=lambda event: event[1]):
        index = next((k for k, word in enumerate(words) if word.end > character), len(words) - 1)
        highest = max(highest, index)
        if 0 <= sample < total and highest >= 0:
            previous = marks.get(sample)
            marks[sample] = highest if previous is None else max(previous, highest)
    points = sorted(marks)
    labels: list[int | None] = [None]
    lengths = [points[0] if points else total]
    for k, point in enumerate(points):
        labels.append(marks[point])
        lengths.append((points[k + 1] if k + 1 < len(points) else total) - point)
    return labels, lengths


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None]) -> None:
    register(EspeakEngine())
