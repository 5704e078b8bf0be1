"""XTTS v2 at its real size, with random weights: what the model costs on this CPU.

Real XTTS v2 weights cannot be fetched here, and the tiny test checkpoint (2 GPT layers, width 64)
costs nothing like the real model. This builds, once, a random-weight checkpoint with XTTS v2's real
dimensions — GPT 30 layers × 1024 channels × 16 heads, 1026 audio tokens, perceiver resampler, the
stock HiFi-GAN decoder — through the same `build_tiny_xtts` code and loads it through the engine's
own loading path. Random weights never emit the stop token (it is masked), so each generation makes
exactly the capped number of audio tokens: costs per token and per second of audio are real, the
audio is noise.

Figures (torch threads as ``--threads`` says, like every benchmark here; 0: torch's default):
* GPT milliseconds per audio token: the slope of GPT time over two capped lengths (fixed costs cancel);
  GPT time is a call's wall time minus the time inside the HiFi-GAN decoder (timed by a wrapper; the
  sentences are seeded, so they are decoded once, after their steps, where the wrapper sees it);
* decoder real-time factor: decoder seconds per second of audio;
* time to first audio, streamed (the gateway's windowed streamer), and its total against unstreamed;
* conditioning cost per second of reference audio (`compute_latents`: slope over two clip lengths);
* what a preset saves: a synthesis by preset (latents stored) against the same with a new upload
  (conditioning of a 6 s clip first), paired per round.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import CACHE_DIR, Budget, Context, Figure, Result, Skip, median, paired
from tts_gateway.engines.tiny_xtts import V2_MAX_AUDIO_TOKENS, V2_SIZE

LAYERS, WIDTH, HEADS = V2_SIZE["layers"], V2_SIZE["width"], V2_SIZE["heads"]  # XTTS v2's GPT
SHORT_TOKENS, LONG_TOKENS = 24, V2_MAX_AUDIO_TOKENS  # ~1.1 s and ~3.3 s of audio (about 21.5 tokens a second)
TEXT = "The birch canoe slid on the smooth planks."
NEEDED_DISK = 4 * 1024 ** 3  # the checkpoint is ~1.9 GB; room for the temporary copy while building


def real_size_checkpoint(ctx: Context) -> Path:
    """XTTS v2-sized random checkpoint, built once into .cache/bench (git-ignored)."""
    from tts_gateway.engines.tiny_xtts import build_tiny_xtts

    target = CACHE_DIR / f"xtts-v2-size-{LAYERS}x{WIDTH}"
    if (target / "speakers_xtts.pth").is_file():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE_DIR).free
    if free < NEEDED_DISK:
        raise Skip(f"needs {NEEDED_DISK / 1024 ** 3:.0f} GB free under {CACHE_DIR} for the real-size checkpoint, "
                   f"has {free / 1024 ** 3:.1f} GB")
    ctx.log(f"building a random-weight XTTS v2-size checkpoint ({LAYERS} layers × {WIDTH}; once, ~2 GB)")
    building = Path(tempfile.mkdtemp(prefix="xtts-v2-size-", dir=CACHE_DIR))
    try:
        build_tiny_xtts(building, max_audio_tokens=LONG_TOKENS, **V2_SIZE)
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def reference_clip(seconds: float, rate: int) -> np.ndarray:
    """A voiced-sounding test clip: a gliding harmonic tone with a syllable-rate envelope."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * voice * envelope).astype(np.float32)


def run(ctx: Context, result: Result) -> None:
    import psutil
    import torch

    from tts_gateway.engines.base import SynthesisOptions, VoiceInput
    from tts_gateway.engines.xtts_engine import XttsEngine
    from tts_gateway.engines.xtts_streaming import stream_inference

    checkpoint = real_size_checkpoint(ctx)
    engine = XttsEngine(checkpoint, device="cpu", threads=ctx.threads)
    started = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - started
    model = engine._model
    # Weights packed for oneDNN at load are buffers, no longer parameters: count both.
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_mkldnn)
    rss_mb = psutil.Process().memory_info().rss / 1e6
    ctx.log(f"real-size XTTS: {params / 1e6:.0f} M parameters, loaded in {load_s:.1f} s, RSS {rss_mb:.0f} MB, "
            f"torch threads {torch.get_num_threads()}")
    rounds = 1 if ctx.quick else 3
    budget = Budget(300 if ctx.quick else 1500)
    decoder_s = [0.0]
    decoder = model.hifigan_decoder
    original_forward = decoder.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        try:
            return original_forward(*args, **kwargs)
        finally:
            decoder_s[0] += time.perf_counter() - begin

    decoder.forward = timed_forward
    clip_rate = engine.reference_sample_rate
    clips = {seconds: reference_clip(seconds, clip_rate) for seconds in (3.0, 9.0, 6.0)}
    latents = engine.compute_latents(clips[6.0])  # warm-up, and the preset's stored latents
    preset = VoiceInput(latents=latents)

    def synthesize(tokens: int, voice: VoiceInput, seed: int) -> tuple[float, float, float]:
        """(wall seconds, decoder seconds, audio seconds) of one unstreamed sentence of ``tokens`` tokens."""
        model.gpt.max_gen_mel_tokens = tokens
        decoder_s[0] = 0.0
        begin = time.perf_counter()
        # Seeded (repeatable): its GPT steps, then one decode through the timed forward, on the fixed thread count.
        # An unseeded answer is decoded chunk by chunk beside its steps, by layers this wrapper does not see.
        options = SynthesisOptions(language="en", seed=seed, repeatable=True)
        audio = np.concatenate(list(engine.synthesize(TEXT, voice, options)))
        return time.perf_counter() - begin, decoder_s[0], audio.size / engine.sample_rate

    try:
        synthesize(SHORT_TOKENS, preset, 0)  # warm-up
        gpt: dict[int, list[float]] = {SHORT_TOKENS: [], LONG_TOKENS: []}
        dec_rtf: list[float] = []
        audio_s: dict[int, float] = {}
        cond: dict[float, list[float]] = {3.0: [], 9.0: []}
        upload: list[float] = []
        by_preset: list[float] = []
        ttfa: list[float] = []
        streamed: list[float] = []
        unstreamed: list[float] = []
        for r in range(rounds):
            if budget.spent():
                result.notes.append(f"time budget spent after {r} rounds")
                break
            for tokens in (SHORT_TOKENS, LONG_TOKENS) if r % 2 == 0 else (LONG_TOKENS, SHORT_TOKENS):
                wall, dec, seconds = synthesize(tokens, preset, 10 + r)
                gpt[tokens].append(wall - dec)
                audio_s[tokens] = seconds
                if tokens == LONG_TOKENS:
                    dec_rtf.append(dec / seconds)
                    unstreamed.append(wall)
            for seconds in (3.0, 9.0) if r % 2 == 0 else (9.0, 3.0):
                begin = time.perf_counter()
                engine.compute_latents(clips[seconds])
                cond[seconds].append(time.perf_counter() - begin)
            # A new upload (conditioning, then the sentence) and the same sentence by preset, side by side.
            for kind in ("upload", "preset") if r % 2 == 0 else ("preset", "upload"):
                begin = time.perf_counter()
                voice = VoiceInput(latents=engine.compute_latents(clips[6.0])) if kind == "upload" else preset
                synthesize(LONG_TOKENS, voice, 20 + r)
                (upload if kind == "upload" else by_preset).append(time.perf_counter() - begin)
            # Streamed: time to first audio and the whole, with the gateway's windowed streamer.
            model.gpt.max_gen_mel_tokens = LONG_TOKENS
            torch.manual_seed(30 + r)
            gpt_latent, embedding = (torch.from_numpy(latents[k]) for k in ("gpt_cond_latent", "speaker_embedding"))
            begin = time.perf_counter()
            first = None
            for _chunk in stream_inference(model, TEXT, "en", gpt_latent, embedding):
                if first is None:
                    first = time.perf_counter() - begin
            streamed.append(time.perf_counter() - begin)
            ttfa.append(first or 0.0)
    finally:
        decoder.forward = original_forward
        engine.unload()

    if not gpt[LONG_TOKENS]:
        raise Skip("the time budget ran out before one round")
    detail = {"parameters_m": round(params / 1e6), "load_s": round(load_s, 1), "rss_mb": round(rss_mb),
              "torch_threads": torch.get_num_threads(), "rounds": len(gpt[LONG_TOKENS]),
              "audio_seconds": {str(k): round(v, 2) for k, v in audio_s.items()}}
    per_token = (median(gpt[LONG_TOKENS]) - median(gpt[SHORT_TOKENS])) / (LONG_TOKENS - SHORT_TOKENS)
    result.figures.append(Figure(
        "GPT time per audio token (slope over 24 → 72 tokens)", per_token * 1000, "ms",
        medians={f"gpt_{k}_tokens_s": median(v) for k, v in gpt.items()}, detail=detail))
    result.figures.append(Figure("HiFi-GAN decoder real-time factor (decoder s per audio s)", median(dec_rtf), "s/s",
                                 medians={"decoder_rtf": median(dec_rtf)}, detail={"tokens": LONG_TOKENS}))
    result.figures.append(Figure(
        f"time to first audio, streamed ({LONG_TOKENS}-token sentence)", median(ttfa), "s",
        medians={"ttfa_s": median(ttfa), "streamed_total_s": median(streamed),
                 "unstreamed_total_s": median(unstreamed)},
        detail={"tokens": LONG_TOKENS}))
    result.figures.append(paired("streamed / unstreamed wall time, same sentence", streamed, unstreamed,
                                 {"streamed_s": median(streamed), "unstreamed_s": median(unstreamed)}))
    per_second = (median(cond[9.0]) - median(cond[3.0])) / 6.0
    result.figures.append(Figure("conditioning cost per second of reference audio (slope 3 s → 9 s)", per_second,
                                 "s/s", medians={"clip_3s_s": median(cond[3.0]), "clip_9s_s": median(cond[9.0])}))
    result.figures.append(paired("by preset / with a new 6 s upload (one sentence)", by_preset, upload,
                                 {"preset_s": median(by_preset), "upload_s": median(upload)},
                                 saved_s=round(median(upload) - median(by_preset), 3)))
    ctx.log(f"real-size XTTS: GPT {per_token * 1000:.0f} ms/token, decoder RTF {median(dec_rtf):.2f}, "
            f"TTFA streamed {median(ttfa):.2f} s, conditioning {per_second:.3f} s per s of audio")
