"""XTTS streaming at linear cost: decode each new chunk from a bounded window of GPT latents.

coqui-tts's ``Xtts.inference_stream`` re-runs the HiFi-GAN decoder on *every* latent generated so far
each time a chunk is due, so a sentence of n chunks costs n(n+1)/2 chunk decodes. Here each chunk is
decoded once, from a window: the new frames plus ``context`` frames on each side (the decoder is a
stack of non-causal convolutions whose reach is bounded), and a short linear crossfade with the tail
of the previous window hides what is left of the seam.

The decoder's input is not the latents themselves: ``HifiDecoder.forward`` first stretches them with
two linear interpolations (×4 to the mel frame rate, ×24000/22050 to the output rate; a third, the
speed, comes before). The second ratio is not an integer, so a window cut from the latents would sit
at a fractional offset from the one-shot frames. `FrameSource` therefore computes exactly the
frames the one-shot call would compute, at any index, with the same index arithmetic as
``torch.nn.functional.interpolate(mode="linear", align_corners=False)`` and a given ``scale_factor``,
and releases a frame only once no later latent can change it. The waveform decoder then runs on
those frames directly.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from typing import Any

# Decoder frames (256 output samples each) of context on each side of a window, and of crossfade.
CONTEXT_FRAMES = 12  # the HiFi-GAN reach: with 12 a window decodes exactly what the one-shot call does
CROSSFADE_FRAMES = 2
# GPT tokens before the first chunk (time to first audio) and between later ones.
FIRST_CHUNK_TOKENS = 8
CHUNK_TOKENS = 24


class FrameSource:
    """The decoder's input frames (after its interpolations) computed from a growing list of latents.

    Args:
        scales: The interpolation scale factors applied in order (e.g. ``[speed⁻¹, 4, 24000/22050]``).
    """

    def __init__(self, scales: Sequence[float]) -> None:
        self.scales = [float(s) for s in scales]
        self.latents: list[Any] = []  # [k, D] tensors
        self._cat: Any = None
        self.final = False

    @property
    def tokens(self) -> int:
        return sum(int(t.shape[0]) for t in self.latents)

    def push(self, latent: Any) -> None:
        self.latents.append(latent)
        self._cat = None

    def _matrix(self) -> Any:
        import torch

        if self._cat is None:
            self._cat = torch.cat(self.latents, dim=0)
        return self._cat

    def lengths(self) -> list[int]:
        """Input length of each stage and the output length, for the final sequence: floor(n · scale)."""
        sizes = [self.tokens]
        for scale in self.scales:
            sizes.append(math.floor(sizes[-1] * scale))
        return sizes

    def available(self) -> int:
        """Frames no later latent can change (all of them once ``final``)."""
        if self.final:
            return self.lengths()[-1]
        known = self.tokens  # leading entries of the current stage whose values are settled
        for scale in self.scales:
            # output j is settled when both of its inputs, floor(src) and floor(src)+1, are settled
            j = math.floor(known * scale) + 1
            while j > 0 and _source_index(j - 1, scale) + 1 > known - 1:
                j -= 1
            known = j
        return known

    def frames(self, start: int, stop: int) -> Any:
        """Frames ``[start, stop)`` as a ``[1, D, stop - start]`` tensor (float, on the latents' device)."""
        import torch

        matrix = self._matrix()
        lengths = self.lengths() if self.final else None
        values, offset = self._stage(len(self.scales) - 1, start, stop, matrix, lengths)
        assert offset == start
        return values.transpose(0, 1).unsqueeze(0).to(torch.float32).contiguous()

    def _stage(self, k: int, start: int, stop: int, matrix: Any, lengths: list[int] | None) -> tuple[Any, int]:
        """Values of stage ``k``'s outputs ``[start, stop)`` (stage -1: the latents), and ``start``."""
        import torch

        if k < 0:
            return matrix[start:stop], start
        source = _sources(torch.arange(start, stop), self.scales[k])
        low = source.floor().long()
        weight = (source - low.to(source.dtype)).to(matrix.dtype).unsqueeze(1)
        high = low + 1
        if lengths is not None:  # torch: idx1 = idx0 + (idx0 < in - 1)
            high = torch.where(low < lengths[k] - 1, high, low)
        first, last = int(low.min()), int(high.max()) + 1
        values, offset = self._stage(k - 1, first, last, matrix, lengths)
        low_values = values[low - offset]
        high_values = values[high - offset]
        return low_values + (high_values - low_values) * weight, start


def _sources(index: Any, scale: float) -> Any:
    """Source coordinates of output ``index`` as torch's linear interpolation computes them for a given
    ``scale_factor`` (align_corners=False): ``max((1/scale) · (j + 0.5) - 0.5, 0)`` in float32."""
    import torch

    inverse = torch.tensor(1.0 / scale, dtype=torch.float32)
    return (inverse * (index.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)


def _source_index(j: int, scale: float) -> int:
    import torch

    return int(_sources(torch.tensor([j]), scale).floor()[0])


class WindowedDecoder:
    """Turns XTTS GPT latents into audio chunk by chunk, each frame decoded a bounded number of times.

    Args:
        decoder: The model's ``hifigan_decoder`` (``HifiDecoder``).
        speaker_embedding: ``[1, 512, 1]`` on the decoder's device.
        length_scale: 1 / speed (as ``inference_stream``).
        context: Decoder frames of context on each side of a window.
        crossfade: Decoder frames crossfaded between consecutive windows.
    """

    def __init__(self, decoder: Any, speaker_embedding: Any, length_scale: float = 1.0, *,
                 context: int = CONTEXT_FRAMES, crossfade: int = CROSSFADE_FRAMES) -> None:
        scales: list[float] = [] if length_scale == 1.0 else [length_scale]
        scales.append(decoder.ar_mel_length_compression / decoder.output_hop_length)
        if decoder.output_sample_rate != decoder.input_sample_rate:
            scales.append(decoder.output_sample_rate / decoder.input_sample_rate)
        self.source = FrameSource(scales)
        self.decoder = decoder
        self.g = speaker_embedding
        self.context = context
        self.crossfade = crossfade
        self.hop = self._hop(decoder)
        self.emitted = 0  # frames already sent
        self._tail: Any = None  # the last window's samples for frames [emitted, emitted + crossfade)
        self.decoded_frames = 0  # frames run through the decoder (for the benchmark)

    @staticmethod
    def _hop(decoder: Any) -> int:
        rates = getattr(decoder.waveform_decoder, "upsample_rates", None)
        if rates:
            return int(math.prod(rates))
        return int(decoder.output_hop_length)

    def push(self, latent: Any) -> None:
        self.source.push(latent)

    def pending(self) -> int:
        """Frames that could be sent now (settled, with right context and crossfade behind them)."""
        if self.source.final:
            return self.source.available() - self.emitted
        return max(0, self.source.available() - self.context - self.crossfade - self.emitted)

    def finish(self) -> None:
        self.source.final = True

    def decode(self) -> Any:
        """Audio for the pending frames (a 1-D tensor), decoded from a window around them."""
        import torch

        total = self.source.available()
        start = self.emitted
        stop = total if self.source.final else total - self.context - self.crossfade
        if stop <= start:
            return torch.zeros(0)
        keep_stop = stop if self.source.final else stop + self.crossfade
        lo = max(0, start - self.context)
        hi = min(total, keep_stop + self.context)
        frames = self.source.frames(lo, hi)
        wav = self.decoder.waveform_decoder(frames, g=self.g).reshape(-1)
        self.decoded_frames += hi - lo
        audio = wav[(start - lo) * self.hop: (keep_stop - lo) * self.hop]
        cut = (stop - start) * self.hop
        chunk, tail = audio[:cut], audio[cut:]
        if self._tail is not None and self._tail.numel():
            n = min(self._tail.numel(), chunk.numel())
            fade = torch.linspace(0.0, 1.0, n, device=chunk.device, dtype=chunk.dtype)
            chunk = chunk.clone()
            chunk[:n] = self._tail[:n] * (1.0 - fade) + chunk[:n] * fade
        self._tail = tail
        self.emitted = stop
        return chunk


def stream_inference(model: Any, text: str, language: str, gpt_cond_latent: Any, speaker_embedding: Any, *,
                     speed: float = 1.0, first_chunk: int = FIRST_CHUNK_TOKENS, chunk: int = CHUNK_TOKENS,
                     context: int = CONTEXT_FRAMES, crossfade: int = CROSSFADE_FRAMES,
                     temperature: float = 0.75, length_penalty: float = 1.0, repetition_penalty: float = 10.0,
                     top_k: int = 50, top_p: float = 0.85, stats: dict[str, int] | None = None,
                     ) -> Generator[Any, None, None]:
    """As ``Xtts.inference_stream`` for one sentence (same sampling, so the same seed gives the same
    tokens), but every frame is decoded once plus bounded context: linear in the sentence length.
    Yields 1-D float tensors at the model's output rate; torch's inference mode is on only while it works
    (as coqui's decorated generator), never while the caller holds a chunk."""
    import torch

    steps = _stream(model, text, language, gpt_cond_latent, speaker_embedding, speed=speed, first_chunk=first_chunk,
                    chunk=chunk, context=context, crossfade=crossfade, temperature=temperature,
                    length_penalty=length_penalty, repetition_penalty=repetition_penalty, top_k=top_k, top_p=top_p,
                    stats=stats)
    try:
        while True:
            with torch.inference_mode():
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()


def _stream(model: Any, text: str, language: str, gpt_cond_latent: Any, speaker_embedding: Any, *, speed: float,
            first_chunk: int, chunk: int, context: int, crossfade: int, temperature: float, length_penalty: float,
            repetition_penalty: float, top_k: int, top_p: float, stats: dict[str, int] | None
            ) -> Generator[Any, None, None]:
    import torch

    language = language.split("-")[0]
    device = model.device
    gpt_cond_latent = gpt_cond_latent.to(device)
    speaker_embedding = speaker_embedding.to(device)
    sentence = text.strip().lower()
    tokens = torch.IntTensor(model.tokenizer.encode(sentence, lang=language)).unsqueeze(0).to(device)
    if tokens.shape[-1] >= model.args.gpt_max_text_tokens:
        raise ValueError("XTTS can only generate text with a maximum of 400 tokens")
    fake_inputs = model.gpt.compute_embeddings(gpt_cond_latent, tokens)
    generator = model.gpt.get_generator(
        fake_inputs=fake_inputs, top_k=top_k, top_p=top_p, temperature=temperature, do_sample=True,
        num_beams=1, num_return_sequences=1, length_penalty=float(length_penalty),
        repetition_penalty=float(repetition_penalty), output_attentions=False, output_hidden_states=True,
        return_dict_in_generate=True,
    )
    window = WindowedDecoder(model.hifigan_decoder, speaker_embedding, 1.0 / max(speed, 0.05),
                             context=context, crossfade=crossfade)
    due = first_chunk
    for _token, latent in generator:
        window.push(latent)
        if window.source.tokens >= due and window.pending() > 0:
            yield window.decode()
            due = window.source.tokens + chunk
    window.finish()
    yield window.decode()
    if stats is not None:
        stats["decoded_frames"] = stats.get("decoded_frames", 0) + window.decoded_frames
        stats["frames"] = stats.get("frames", 0) + window.source.available()
