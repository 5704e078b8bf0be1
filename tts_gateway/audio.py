"""Audio output: resampling and encoding to wav, pcm, flac, mp3 and opus, whole or streamed.

Everything goes through libsndfile (soundfile) and soxr; no ffmpeg. Streaming encoders hand out
bytes as soon as they exist: WAV with an open-ended header, raw PCM, and Ogg Opus pages as
libsndfile writes them. FLAC and MP3 are sent whole because their headers are fixed up at close.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    sf_format: str | None
    sf_subtype: str | None
    rates: tuple[int, ...] | None = None  # None: any rate in 8000–48000
    # Whether bytes can leave before the end. FLAC's and MP3's headers carry the length, which
    # libsndfile fixes up at close; sent early, decoders read them wrong, so those go whole.
    incremental: bool = True

    def check_rate(self, rate: int) -> str | None:
        """Why ``rate`` cannot be encoded in this format, or None."""
        if self.rates is not None and rate not in self.rates:
            return f"{self.name} supports sample rates {', '.join(map(str, self.rates))}, not {rate}"
        return None

    def default_rate(self, engine_rate: int) -> int:
        if self.rates is None or engine_rate in self.rates:
            return engine_rate
        return max(r for r in self.rates if r <= 48000)


_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav", "audio/wav", "WAV", "PCM_16"),
    "pcm": AudioFormat("pcm", "audio/L16", None, None),
    "flac": AudioFormat("flac", "audio/flac", "FLAC", "PCM_16", incremental=False),
    "mp3": AudioFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", _MP3_RATES, incremental=False),
    "opus": AudioFormat("opus", "audio/ogg", "OGG", "OPUS", (8000, 12000, 16000, 24000, 48000)),
}


def media_type(fmt: AudioFormat, rate: int) -> str:
    if fmt.name == "pcm":
        return f"audio/L16;rate={rate};channels=1"
    if fmt.name == "opus":
        return "audio/ogg;codecs=opus"
    return fmt.media_type


def to_pcm16(samples: np.ndarray) -> bytes:
    clipped = np.clip(np.nan_to_num(samples, copy=False), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def streaming_wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header with open-ended sizes (0xFFFFFFFF), for chunked responses."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", unknown)
    )


class _Sink(io.RawIOBase):
    """A seekable in-memory file that remembers how much of itself was already handed out."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.pos = 0
        self.sent = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        end = self.pos + len(chunk)
        self.buf[self.pos : end] = chunk
        self.pos = end
        return len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.buf)}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = len(self.buf) if size is None or size < 0 else self.pos + size
        data = bytes(self.buf[self.pos : end])
        self.pos += len(data)
        return data

    def take(self) -> bytes:
        data = bytes(self.buf[self.sent :])
        self.sent = len(self.buf)
        return data


class Encoder:
    """Encode float32 mono chunks; ``feed`` and ``close`` return the bytes ready to send."""

    def __init__(self, fmt: AudioFormat, rate: int, *, streaming: bool) -> None:
        self.fmt = fmt
        self.rate = rate
        self.streaming = streaming and fmt.incremental
        self._sink: _Sink | None = None
        self._file: sf.SoundFile | None = None
        self._started = False
        self._chunks: list[np.ndarray] = []

    def _open(self) -> bytes:
        self._started = True
        if self.fmt.name == "pcm":
            return b""
        if self.fmt.name == "wav" and self.streaming:
            return streaming_wav_header(self.rate)
        if self.fmt.name == "wav":
            return b""  # written whole at close, so the header carries the true sizes
        self._sink = _Sink()
        self._file = sf.SoundFile(self._sink, "w", samplerate=self.rate, channels=1,
                                  format=self.fmt.sf_format, subtype=self.fmt.sf_subtype)
        return b""

    def feed(self, samples: np.ndarray) -> bytes:
        head = b"" if self._started else self._open()
        if samples.size == 0:
            return head
        if self.fmt.name == "pcm" or (self.fmt.name == "wav" and self.streaming):
            return head + to_pcm16(samples)
        if self._file is None:
            self._chunks.append(samples)
            return head
        self._file.write(np.clip(samples, -1.0, 1.0))
        assert self._sink is not None
        return head + (self._sink.take() if self.streaming else b"")

    def close(self) -> bytes:
        head = b"" if self._started else self._open()
        if self.fmt.name == "wav" and not self.streaming:
            out = io.BytesIO()
            data = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
            sf.write(out, np.clip(data, -1.0, 1.0), self.rate, format="WAV", subtype="PCM_16")
            return head + out.getvalue()
        if self._file is None or self._sink is None:
            return head
        self._file.close()
        self._file = None
        if self.streaming:
            return head + self._sink.take()
        return head + bytes(self._sink.buf)

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except (RuntimeError, sf.LibsndfileError):  # half-written stream: nothing to save
                pass
            self._file = None


class Resampler:
    """Chunk-by-chunk resampling with soxr (no clicks at chunk boundaries)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.passthrough = in_rate == out_rate
        self._stream = None if self.passthrough else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32",
                                                                        quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return np.asarray(self._stream.resample_chunk(samples.astype(np.float32), last=last), np.float32)


def time_stretch(samples: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """Change tempo without changing pitch: the part of a speed an engine's own control does not reach."""
    if abs(speed - 1.0) < 1e-6 or samples.size < 2048:
        return samples
    import librosa

    return np.asarray(librosa.effects.time_stretch(samples.astype(np.float32), rate=speed), np.float32)


def silence(rate: int, seconds: float) -> np.ndarray:
    return np.zeros(int(rate * seconds), dtype=np.float32)
