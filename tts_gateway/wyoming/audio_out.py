"""A request's audio as Wyoming sends it: ``audio-start``, ``audio-chunk``s of whole samples with running
timestamps, ``audio-stop``; 16-bit mono PCM at the engine's own rate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from tts_gateway.audio import silence
from tts_gateway.core.service import SENTENCE_PAUSE_S
from tts_gateway.errors import Unavailable

WIDTH, CHANNELS = 2, 1  # 16-bit mono PCM
CHUNK_SAMPLES = 1024  # per audio-chunk, as wyoming-piper sends


class AudioOut:
    """The audio of one request, framed into events and handed to ``send``."""

    def __init__(self, send: Callable[[Event], Awaitable[None]]) -> None:
        self._send = send
        self.rate: int | None = None
        self._carry = b""
        self._samples = 0

    @property
    def started(self) -> bool:
        return self.rate is not None

    def _ms(self) -> int:
        return self._samples * 1000 // self.rate if self.rate else 0

    async def start(self, rate: int) -> None:
        if self.rate is None:
            self.rate = rate
            await self._send(AudioStart(rate=rate, width=WIDTH, channels=CHANNELS, timestamp=0).event())
        elif rate != self.rate:  # one request speaks with one voice, so one engine and one rate
            raise Unavailable(f"the audio rate changed mid-request ({self.rate} → {rate} Hz)")

    async def write(self, data: bytes) -> None:
        assert self.rate is not None
        data = self._carry + data
        end = len(data) - len(data) % WIDTH
        self._carry = data[end:]
        step = CHUNK_SAMPLES * WIDTH * CHANNELS
        for offset in range(0, end, step):
            piece = data[offset : min(offset + step, end)]
            timestamp = self._ms()
            self._samples += len(piece) // (WIDTH * CHANNELS)
            await self._send(AudioChunk(rate=self.rate, width=WIDTH, channels=CHANNELS, audio=piece,
                                        timestamp=timestamp).event())

    async def pause(self) -> None:
        """The gateway's pause between sentences (as `SynthesisService` puts between pieces)."""
        assert self.rate is not None
        await self.write(bytes(silence(self.rate, SENTENCE_PAUSE_S).size * WIDTH))

    async def stop(self) -> None:
        await self._send(AudioStop(timestamp=self._ms()).event())
