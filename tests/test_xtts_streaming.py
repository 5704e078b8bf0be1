"""Issue 15: XTTS streaming at linear cost (the decoder run incrementally: each frame decoded once)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tts_gateway.engines.base import SynthesisOptions, VoiceInput
from tts_gateway.engines.xtts_engine import XttsEngine
from tts_gateway.engines.xtts_streaming import FrameSource, IncrementalDecoder

pytestmark = pytest.mark.xtts


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    assert reference.shape == other.shape, (reference.shape, other.shape)
    noise = float(np.sum((reference - other) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference ** 2)) / noise)


@pytest.fixture(scope="module")
def engine(tiny_xtts: Path) -> Any:
    xtts = XttsEngine(tiny_xtts, threads=2)
    xtts.load()
    yield xtts
    xtts.unload()


@pytest.mark.parametrize("length_scale", [1.0, 1 / 1.5, 1.3])
def test_frames_are_exactly_the_one_shot_decoder_input(engine: Any, length_scale: float) -> None:
    import torch

    decoder = engine._model.hifigan_decoder
    latents = torch.randn(131, 64, generator=torch.Generator().manual_seed(1))
    x = latents[None]
    if length_scale != 1.0:
        x = torch.nn.functional.interpolate(x.transpose(1, 2), scale_factor=length_scale, mode="linear").transpose(1, 2)
    mel = decoder.ar_mel_length_compression / decoder.output_hop_length  # 4
    rate = decoder.output_sample_rate / decoder.input_sample_rate  # 24000 / 22050
    z = torch.nn.functional.interpolate(x.transpose(1, 2), scale_factor=[mel], mode="linear")
    z = torch.nn.functional.interpolate(z, scale_factor=[rate], mode="linear")
    source = FrameSource(([length_scale] if length_scale != 1.0 else []) + [mel, rate])
    settled: list[tuple[int, Any]] = []
    for i in range(latents.shape[0]):
        source.push(latents[i: i + 1])
        if i % 17 == 5:  # frames released early never change later
            n = source.available()
            settled.append((n, source.frames(0, n)))
    source.final = True
    assert source.available() == z.shape[-1]
    final = source.frames(0, z.shape[-1])
    assert float((final - z).abs().max()) < 1e-4
    for n, early in settled:
        assert n > 0 and float((final[..., :n] - early).abs().max()) < 1e-4


def test_incremental_decoding_is_the_one_shot_waveform_at_linear_cost(engine: Any) -> None:
    import torch

    decoder = engine._model.hifigan_decoder
    speaker = engine._speakers.speakers(engine.checkpoint).get("ana-florence").speaker_embedding
    latents = torch.randn(240, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        one_shot = decoder(latents[None], g=speaker).reshape(-1).numpy()
        incremental = IncrementalDecoder(decoder, speaker)
        chunks = []
        for i in range(latents.shape[0]):
            incremental.push(latents[i: i + 1])
            if (i + 1) % 24 == 0 and incremental.pending():
                chunks.append(incremental.decode())
            elif i == 2:  # too few frames to complete a sample: nothing yet, and nothing lost
                assert incremental.decode().numel() == 0
        incremental.finish()
        chunks.append(incremental.decode())
    streamed = torch.cat(chunks).numpy()
    assert len(chunks) >= 10 and all(c.numel() for c in chunks)
    assert snr_db(one_shot, streamed) > 80  # the same samples, up to float rounding
    # each frame decoded exactly once (coqui's re-decoding would be ~5× here)
    assert incremental.decoded_frames == incremental.source.available()


def test_streamed_sentence_matches_unstreamed(engine: Any) -> None:
    voice = VoiceInput(builtin="claribel-dervla")
    text = "Streaming should sound exactly like the whole sentence."

    def run(streaming: bool) -> list[np.ndarray]:
        return list(engine.synthesize(text, voice, SynthesisOptions(language="en", seed=11, streaming=streaming)))

    streamed, whole = run(True), run(False)
    assert len(streamed) >= 2 and len(whole) == 1  # streamed: audio before the sentence is finished
    assert snr_db(whole[0], np.concatenate(streamed)) > 60
    slow = list(engine.synthesize(text, voice, SynthesisOptions(language="en", seed=11, streaming=True, speed=0.8)))
    slow_whole = list(engine.synthesize(text, voice, SynthesisOptions(language="en", seed=11, speed=0.8)))
    assert snr_db(slow_whole[0], np.concatenate(slow)) > 60


def test_the_decoder_asks_for_the_torch_thread_only_when_it_has_audio_to_make(engine: Any) -> None:
    """A sentence's decoder makes no torch call before its first chunk of tokens: a call at its start would
    take a slot of the core budget just when the GPT runs the prompts (which then ran on one core for a
    whole join). Every call it makes yields audio, and together they are the one-shot waveform."""
    import torch

    from tts_gateway.engines.xtts_streaming import decode_latents

    decoder = engine._model.hifigan_decoder
    speaker = engine._speakers.speakers(engine.checkpoint).get("ana-florence").speaker_embedding
    latents = torch.randn(60, 64, generator=torch.Generator().manual_seed(3))
    pushed = 0
    calls: list[tuple[int, bool]] = []

    def tokens() -> Any:
        nonlocal pushed
        for i in range(latents.shape[0]):
            pushed = i + 1
            yield latents[i: i + 1]

    def run(fn: Any, urgent: bool) -> Any:
        calls.append((pushed, urgent))
        with torch.inference_mode():
            return fn()

    with torch.inference_mode():
        one_shot = decoder(latents[None], g=speaker).reshape(-1).numpy()
    chunks = list(decode_latents(SimpleNamespace(hifigan_decoder=decoder), tokens(), speaker, first_chunk=8,
                                 chunk=20, run=run))
    assert calls[0] == (8, True)  # the first call is the listener's first audio, urgent
    assert [p for p, _ in calls] == [8, 28, 48, 60] and not any(u for _, u in calls[1:])
    assert len(chunks) == len(calls)
    assert snr_db(one_shot, torch.cat(chunks).numpy()) > 80
