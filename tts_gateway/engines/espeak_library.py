"""libespeak-ng through ctypes, for speech with word events (the command line reports none).

The library is the one the ``espeak-ng`` program links (found with ``ldd``, loaded by its path so
that no other copy of espeak-ng in the process, such as the phonemizer's, is taken for it). It keeps
global state, so one lock serialises its calls. Each ``WORD`` event carries the character where the
word starts in the text and the sample where its sound starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import subprocess
import threading
from dataclasses import dataclass

import numpy as np

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: the callback gets the audio before espeak_Synth returns
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE = 1  # espeakRATE
_EVENT_END_OF_LIST, _EVENT_WORD, _EVENT_END = 0, 1, 5


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Spoken:
    """Audio (float32) and its events: words as (character index from 0, first sample), and the samples
    where clauses end."""

    audio: np.ndarray
    words: list[tuple[int, int]]
    clause_ends: list[int]


def library_path(binary: str) -> str | None:
    """The libespeak-ng that ``binary`` runs with (else the system's), or None."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found = re.search(r"libespeak-ng\.so\S*\s+=>\s+(\S+)", out)
    return found.group(1) if found else ctypes.util.find_library("espeak-ng")


class EspeakLibrary:
    """One loaded libespeak-ng; `speak` is thread-safe (calls are serialised)."""

    def __init__(self, path: str) -> None:
        self._lib = ctypes.CDLL(path)
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int]] = []
        self._callback = _CALLBACK(self._collect)  # kept alive as long as the library may call it
        self.sample_rate = int(self._lib.espeak_Initialize(_SYNCHRONOUS, 0, None, 0))
        if self.sample_rate <= 0:
            raise RuntimeError("libespeak-ng failed to initialise")
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short], count: int, events: ctypes._Pointer[_Event]) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).astype(np.float32) / 32768.0)
        index = 0
        while events[index].type != _EVENT_END_OF_LIST:
            event = events[index]
            self._events.append((event.type, event.text_position, event.sample))
            index += 1
        return 0

    def speak(self, text: str, voice: str, wpm: int) -> Spoken:
        data = text.encode("utf-8")
        with self._lock:
            self._chunks, self._events = [], []
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"libespeak-ng has no voice {voice!r}")
            self._lib.espeak_SetParameter(_RATE, wpm, 0)
            if self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
                raise RuntimeError("libespeak-ng failed to synthesize")
            self._lib.espeak_Synchronize()
            chunks, events = self._chunks, self._events
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        # Events are stamped before espeak-ng's speed-up of fast speech (sonic), which shortens the
        # audio after them: the last clause's end marks where the audio ends, so samples scale to it.
        stamped_end = max((sample for kind, _, sample in events if kind == _EVENT_END), default=0)
        scale = audio.size / stamped_end if stamped_end > 0 else 1.0
        # text_position counts characters from 1.
        words = [(position - 1, round(sample * scale)) for kind, position, sample in events if kind == _EVENT_WORD]
        ends = [round(sample * scale) for kind, _, sample in events if kind == _EVENT_END]
        return Spoken(audio, words, ends)
