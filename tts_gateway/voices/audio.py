"""Reference-audio preprocessing: decode, check, downmix, resample, trim, normalise, hash."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from tts_gateway.errors import Invalid, UnsupportedMedia


class InvalidReferenceAudio(Invalid):
    """Reference audio that cannot condition a voice: too short, too long, silent, undecodable."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="invalid-reference-audio", title="Invalid reference audio", field="audio")


class NotAudio(UnsupportedMedia):
    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="not-audio", title="Not audio")

MIN_SECONDS = 2.0
MAX_SECONDS = 60.0
SILENCE_PEAK = 1e-3  # -60 dBFS: below this there is nothing to clone
TRIM_TOP_DB = 40.0

# Leading bytes of containers libsndfile reads; anything else is "not audio" (415), while a
# known container that fails to decode is "undecodable" (422).
_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b"caff", b".snd", b"wvpk")


_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-f]+>")
MIN_RATE, MAX_RATE = 8000, 384000
_SHORT_DATA = re.compile(r"data : (\d+) \(should be (\d+)\)")
_OPEN_ENDED = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 8}  # streamed WAVs declare no real size


@dataclass(frozen=True)
class ReferenceAudio:
    samples: np.ndarray  # float32 mono at ``rate``, trimmed and peak-normalised
    rate: int
    sha256: str  # of the normalised 16-bit samples: same voice audio, same hash
    clip_sha256s: tuple[str, ...]  # of the uploaded bytes, for the record

    @property
    def duration(self) -> float:
        return self.samples.size / self.rate


def looks_like_audio(data: bytes) -> bool:
    if data[:4] in _MAGIC or data[:3] == b"ID3":
        return True
    return len(data) > 1 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0  # MPEG frame sync


def decode(data: bytes, label: str) -> tuple[np.ndarray, int]:
    """Decode one uploaded file to float32 (frames, channels)."""
    if not data:
        raise NotAudio(f"{label} is empty")
    if not looks_like_audio(data):
        raise NotAudio(
            f"{label} is not an audio file (send WAV, FLAC, OGG or MP3)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            rate = handle.samplerate
            short = _SHORT_DATA.search(handle.extra_info)
            if short and int(short.group(1)) not in _OPEN_ENDED and int(short.group(2)) < int(short.group(1)):
                raise InvalidReferenceAudio(
                    f"{label} could not be decoded: it is truncated ({short.group(2)} of "
                    f"{short.group(1)} data bytes present)"
                )
            if handle.frames > MAX_SECONDS * rate * 4 and handle.frames < 2**62:
                raise InvalidReferenceAudio(f"{label} is {handle.frames / rate:.1f} s long; the limit is "
                                            f"{MAX_SECONDS:.0f} s")
            samples = handle.read(dtype="float32", always_2d=True)
    except InvalidReferenceAudio:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, MemoryError) as exc:
        reason = _OBJECT_REPR.sub("the file", str(exc))
        raise InvalidReferenceAudio(f"{label} could not be decoded (truncated or corrupt): {reason}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidReferenceAudio(f"{label} has a sample rate of {rate} Hz; {MIN_RATE}–{MAX_RATE} Hz is accepted")
    if samples.size == 0:
        raise InvalidReferenceAudio(f"{label} holds no samples")
    if not np.isfinite(samples).all():
        raise InvalidReferenceAudio(f"{label} holds NaN or infinite samples")
    return samples, rate


def trim_silence(samples: np.ndarray, top_db: float = TRIM_TOP_DB, frame: int = 2048, hop: int = 512) -> np.ndarray:
    """Cut leading and trailing frames quieter than ``top_db`` below the loudest frame.

    The same rule as librosa.effects.trim, in plain numpy: librosa's version JIT-compiles on
    first use, which costs seconds on every fresh process.
    """
    if samples.size <= frame:
        return samples
    frames = np.lib.stride_tricks.sliding_window_view(samples, frame)[::hop]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    loudest = float(rms.max())
    if loudest <= 0:
        return samples[:0]
    loud = np.flatnonzero(20 * np.log10(np.maximum(rms, 1e-12) / loudest) > -top_db)
    start = int(loud[0]) * hop
    end = min(samples.size, int(loud[-1]) * hop + frame)
    return samples[start:end]


def prepare_reference(files: list[tuple[str, bytes]], rate: int) -> ReferenceAudio:
    """Turn one or more uploaded clips into one normalised mono clip at ``rate``.

    Raises:
        InvalidReferenceAudio: not audio, undecodable, silent, or too short/long in total.
    """
    if not files:
        raise InvalidReferenceAudio("no reference audio was sent")
    clips: list[np.ndarray] = []
    digests: list[str] = []
    for label, data in files:
        samples, source_rate = decode(data, label)
        duration = samples.shape[0] / source_rate
        if duration > MAX_SECONDS:
            raise InvalidReferenceAudio(f"{label} is {duration:.1f} s long; the limit is {MAX_SECONDS:.0f} s")
        mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        if float(np.max(np.abs(mono))) < SILENCE_PEAK:
            raise InvalidReferenceAudio(f"{label} is silent")
        if source_rate != rate:
            mono = soxr.resample(mono, source_rate, rate, quality="HQ").astype(np.float32)
        clips.append(trim_silence(np.asarray(mono, np.float32)))
        digests.append(hashlib.sha256(data).hexdigest())
    joined = np.concatenate(clips)
    total = joined.size / rate
    if total < MIN_SECONDS:
        raise InvalidReferenceAudio(
            f"reference audio has {total:.2f} s of sound after trimming silence; at least "
            f"{MIN_SECONDS:.0f} s is needed"
        )
    if total > MAX_SECONDS:
        raise InvalidReferenceAudio(f"reference audio totals {total:.1f} s; the limit is {MAX_SECONDS:.0f} s")
    peak = float(np.max(np.abs(joined)))
    normalised = (joined * (0.95 / peak)).astype(np.float32)
    pcm = (np.clip(normalised, -1, 1) * 32767).astype("<i2").tobytes()
    return ReferenceAudio(
        samples=normalised,
        rate=rate,
        sha256=hashlib.sha256(pcm + rate.to_bytes(4, "little")).hexdigest(),
        clip_sha256s=tuple(digests),
    )
