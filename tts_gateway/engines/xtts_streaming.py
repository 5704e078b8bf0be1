"""XTTS streaming at linear cost: run the HiFi-GAN decoder incrementally on the GPT latents.

coqui-tts's ``Xtts.inference_stream`` re-runs the HiFi-GAN decoder on *every* latent generated so far
each time a chunk is due, so a sentence of n chunks costs n(n+1)/2 chunk decodes. Here every
layer of the decoder runs once per sample: the decoder is a stack of convolutions with bounded
reach, so each layer keeps only the tail of its input that its next outputs still need (its zero
padding, at first) and, given new input, computes just the outputs that are now fully determined.
The audio is the one-shot decode's, up to float rounding, with no overlap to re-decode or crossfade:
streamed compute is the one-shot's plus a small overhead per chunk (a first version decoded
overlapping windows with 12 frames of context on each side, which cost 1.27× at 48 tokens).

The decoder's input is not the latents themselves: ``HifiDecoder.forward`` first stretches them with
two linear interpolations (×4 to the mel frame rate, ×24000/22050 to the output rate; a third, the
speed, comes before). `FrameSource` computes exactly the frames the one-shot call would compute, at
any index, with the same index arithmetic as ``torch.nn.functional.interpolate(mode="linear",
align_corners=False)`` and a given ``scale_factor``, and releases a frame only once no later latent
can change it. The waveform decoder then runs on those frames.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

from tts_gateway.engines.xtts_kernels import convolve

# GPT tokens before the first chunk (time to first audio) and between later ones. A chunk carries the
# audio of its tokens less the decoder's look-ahead (about 13 frames, 3 tokens), which the next one
# delivers.
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


def _empty(like: Any, channels: int, length: int) -> Any:
    """An uninitialised ``[1, channels, length]`` in the layout of ``like``: channels-last when it is (the
    decoder's convolutions may run so, `to_channels_last`), so that copying into it is no transposition."""
    if like.dim() == 3 and like.shape[1] > 1 and like.stride(1) == 1:
        return like.new_empty(1, length, channels).transpose(1, 2)
    return like.new_empty(1, channels, length)


class _Conv:
    """A stride-1, "same"-padded ``Conv1d`` after a leaky ReLU, run on a stream: it keeps the activated
    inputs its next outputs still need. The activation writes straight into the buffer the convolution
    reads, so streaming adds no pass over the (large) activations."""

    def __init__(self, conv: Any, like: Any) -> None:
        kernel, dilation, pad = conv.kernel_size[0], conv.dilation[0], conv.padding[0]
        if conv.stride[0] != 1 or conv.groups != 1 or 2 * pad != dilation * (kernel - 1):
            raise ValueError(f"cannot stream {conv}")
        self.conv, self.pad = conv, pad
        # Read once per stream: under weight norm (unless folded at load) every access recomputes it.
        self.weight, self.bias = conv.weight.detach(), conv.bias
        self.kept = like.new_zeros(1, conv.in_channels, pad)  # the left zero padding

    def __call__(self, x: Any, final: bool, slope: float | None = None) -> Any:
        import torch

        kept, n = self.kept.shape[-1], x.shape[-1]
        buffer = _empty(x, x.shape[1], kept + n + (self.pad if final else 0))
        buffer[..., :kept] = self.kept
        if slope is None:
            buffer[..., kept: kept + n] = x
        else:
            torch.ops.aten.leaky_relu.out(x, slope, out=buffer[..., kept: kept + n])
        if final:  # the right zero padding
            buffer[..., kept + n:] = 0.0
        ready = buffer.shape[-1] - 2 * self.pad
        if ready <= 0:
            self.kept = buffer
            return buffer.new_zeros(1, self.conv.out_channels, 0)
        self.kept = buffer[..., ready:].clone()  # not a view: the buffer is large
        return convolve(self.conv, buffer, padding=0, weight=self.weight)


class _Upsample:
    """A ``ConvTranspose1d`` (stride s, kernel k, padding (k - s) / 2) run on a stream: each new input
    completes s outputs, given the ``(k - 1) // s`` inputs before it."""

    def __init__(self, conv: Any, like: Any) -> None:
        kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if conv.groups != 1 or conv.dilation[0] != 1 or conv.output_padding[0] != 0 or 2 * pad != kernel - stride:
            raise ValueError(f"cannot stream {conv}")
        self.conv, self.stride, self.pad = conv, stride, pad
        self.weight, self.bias = conv.weight.detach(), conv.bias  # once per stream (see _Conv)
        self.history = (kernel - 1) // stride
        self.buffer = like.new_zeros(1, conv.in_channels, self.history)  # zero inputs add nothing
        self.crop = pad  # leading outputs the padding removes

    def __call__(self, x: Any, final: bool) -> Any:
        import torch

        buffer = torch.cat([self.buffer, x], dim=-1)
        self.buffer = buffer[..., buffer.shape[-1] - self.history:].clone()  # not a view of the large input
        y = convolve(self.conv, buffer, padding=0, weight=self.weight)
        start = self.history * self.stride  # outputs before it were complete already
        # the last outputs wait for the next input, unless there is none (then the padding crops them)
        stop = y.shape[-1] - self.pad if final else start + x.shape[-1] * self.stride
        crop = min(self.crop, stop - start)
        self.crop -= crop
        return y[..., start + crop: stop]


class _Join:
    """Sums branches that reach the same position at different times (each lags by its own reach). The
    sum is written piecewise into one tensor rather than concatenating each branch's leftover first."""

    def __init__(self, branches: int) -> None:
        self.waiting: list[Any] = [None] * branches

    def __call__(self, parts: list[Any]) -> Any:
        import torch

        waits = [0 if w is None else w.shape[-1] for w in self.waiting]
        ready = min(w + p.shape[-1] for w, p in zip(waits, parts, strict=True))

        def piece(i: int, a: int, b: int) -> Any:  # positions [a, b) of branch i, all in one tensor
            w = waits[i]
            return self.waiting[i][..., a:b] if b <= w else parts[i][..., a - w: b - w]

        total = _empty(parts[0], parts[0].shape[1], ready)
        cuts = sorted({0, ready} | {w for w in waits if w < ready})
        for a, b in itertools.pairwise(cuts):
            torch.add(piece(0, a, b), piece(1, a, b), out=total[..., a:b])
            for i in range(2, len(parts)):  # in the order of the one-shot forward, for the same rounding
                total[..., a:b] += piece(i, a, b)
        left = []
        for w, waiting, part in zip(waits, self.waiting, parts, strict=True):
            if w > ready:
                left.append(torch.cat([waiting[..., ready:], part], dim=-1))
            else:
                left.append(part[..., ready - w:].clone())  # small; not a view of a large tensor
        self.waiting = left
        return total


class _ResBlock:
    """coqui's ``ResBlock1`` (x += c2(lrelu(c1(lrelu(x))))) or ``ResBlock2`` (x += c(lrelu(x))), streamed."""

    def __init__(self, block: Any, like: Any) -> None:
        if hasattr(block, "convs1"):
            stages = [[c1, c2] for c1, c2 in zip(block.convs1, block.convs2, strict=True)]
        else:
            stages = [[c] for c in block.convs]
        self.stages = [[_Conv(c, like) for c in convs] for convs in stages]
        self.joins = [_Join(2) for _ in stages]

    def __call__(self, x: Any, final: bool) -> Any:
        from TTS.vocoder.models.hifigan_generator import LRELU_SLOPE

        for convs, join in zip(self.stages, self.joins, strict=True):
            branch = x
            for conv in convs:
                branch = conv(branch, final, LRELU_SLOPE)
            x = join([branch, x])
        return x


class _Generator:
    """coqui's ``HifiganGenerator.forward`` on a stream of input frames: each call takes the next frames
    and returns the samples they complete (all the rest when ``final``)."""

    def __init__(self, generator: Any, g: Any) -> None:
        if hasattr(generator, "lin_pre"):
            raise ValueError("cannot stream a HifiganGenerator with pre_linear")
        weight = generator.conv_pre.weight
        self.in_channels = generator.conv_pre.in_channels
        self.pre = _Conv(generator.conv_pre, weight)
        self.cond = generator.cond_layer(g) if hasattr(generator, "cond_layer") else None
        self.ups = [_Upsample(up, weight) for up in generator.ups]
        self.up_conds = [c(g) for c in generator.conds] if generator.cond_in_each_up_layer else None
        kernels = generator.num_kernels
        self.blocks = [[_ResBlock(b, weight) for b in generator.resblocks[i * kernels: (i + 1) * kernels]]
                       for i in range(len(self.ups))]
        self.joins = [_Join(kernels) for _ in self.ups]
        self.post = _Conv(generator.conv_post, weight)

    def __call__(self, x: Any, final: bool) -> Any:
        import torch
        import torch.nn.functional as F
        from TTS.vocoder.models.hifigan_generator import LRELU_SLOPE

        o = self.pre(x, final)
        if self.cond is not None:
            o = o + self.cond
        for i, up in enumerate(self.ups):
            o = up(F.leaky_relu(o, LRELU_SLOPE), final)
            if self.up_conds is not None:
                o = o + self.up_conds[i]
            o = self.joins[i]([block(o, final) for block in self.blocks[i]]) / len(self.blocks[i])
        return torch.tanh(self.post(o, final, 0.01))  # F.leaky_relu's default slope, as the one-shot forward


class IncrementalDecoder:
    """Turns XTTS GPT latents into audio chunk by chunk, every decoder layer run once per sample.

    Args:
        decoder: The model's ``hifigan_decoder`` (``HifiDecoder``).
        speaker_embedding: ``[1, 512, 1]`` on the decoder's device.
        length_scale: 1 / speed (as ``inference_stream``).
    """

    def __init__(self, decoder: Any, speaker_embedding: Any, length_scale: float = 1.0) -> None:
        scales: list[float] = [] if length_scale == 1.0 else [length_scale]
        scales.append(decoder.ar_mel_length_compression / decoder.output_hop_length)
        if decoder.output_sample_rate != decoder.input_sample_rate:
            scales.append(decoder.output_sample_rate / decoder.input_sample_rate)
        self.source = FrameSource(scales)
        self._parts = (decoder.waveform_decoder, speaker_embedding)
        self._network: _Generator | None = None
        self.fed = 0  # frames already given to the network
        self.done = False
        self.decoded_frames = 0  # frames run through the decoder (for the benchmark)

    @property
    def network(self) -> _Generator:
        """The streaming generator, made at the first decode: its set-up is torch work (the speaker's
        conditioning), which belongs on the thread that decodes, not the one that makes this object."""
        if self._network is None:
            self._network = _Generator(*self._parts)
        return self._network

    def push(self, latent: Any) -> None:
        self.source.push(latent)

    def pending(self) -> int:
        """Settled frames not yet decoded (all the rest once finished)."""
        return self.source.available() - self.fed

    def finish(self) -> None:
        self.source.final = True

    def decode(self) -> Any:
        """The samples the settled frames complete (a 1-D tensor, possibly empty); after ``finish``, the rest."""
        import torch

        total = self.source.available()
        if self.done or (total <= self.fed and not self.source.final):
            return torch.zeros(0)
        if total > self.fed:
            frames = self.source.frames(self.fed, total)
        else:
            frames = torch.zeros(1, self.network.in_channels, 0, device=self.network.pre.kept.device)
        self.decoded_frames += total - self.fed
        self.fed = total
        self.done = self.source.final
        return self.network(frames, self.source.final).reshape(-1)


def stream_inference(model: Any, text: str, language: str, gpt_cond_latent: Any, speaker_embedding: Any, *,
                     speed: float = 1.0, first_chunk: int = FIRST_CHUNK_TOKENS, chunk: int = CHUNK_TOKENS,
                     temperature: float = 0.75, length_penalty: float = 1.0, repetition_penalty: float = 10.0,
                     top_k: int = 50, top_p: float = 0.85, stats: dict[str, int] | None = None,
                     ) -> Generator[Any, None, None]:
    """As ``Xtts.inference_stream`` for one sentence (same sampling, so the same seed gives the same
    tokens), but every decoder layer runs once per sample: linear in the sentence length.
    Yields 1-D float tensors at the model's output rate; torch's inference mode is on only while it works
    (as coqui's decorated generator), never while the caller holds a chunk."""
    import torch

    steps = _stream(model, text, language, gpt_cond_latent, speaker_embedding, speed=speed, first_chunk=first_chunk,
                    chunk=chunk, temperature=temperature, length_penalty=length_penalty,
                    repetition_penalty=repetition_penalty, top_k=top_k, top_p=top_p, stats=stats)
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
            first_chunk: int, chunk: int, temperature: float, length_penalty: float, repetition_penalty: float,
            top_k: int, top_p: float, stats: dict[str, int] | None) -> Generator[Any, None, None]:
    language = language.split("-")[0]
    device = model.device
    gpt_cond_latent = gpt_cond_latent.to(device)
    speaker_embedding = speaker_embedding.to(device)
    tokens = text_tokens(model, text, language)
    fake_inputs = model.gpt.compute_embeddings(gpt_cond_latent, tokens)
    generator = model.gpt.get_generator(
        fake_inputs=fake_inputs, top_k=top_k, top_p=top_p, temperature=temperature, do_sample=True,
        num_beams=1, num_return_sequences=1, length_penalty=float(length_penalty),
        repetition_penalty=float(repetition_penalty), output_attentions=False, output_hidden_states=True,
        return_dict_in_generate=True,
    )
    yield from decode_latents(model, (latent for _token, latent in generator), speaker_embedding, speed=speed,
                              first_chunk=first_chunk, chunk=chunk, stats=stats)


def text_tokens(model: Any, text: str, language: str) -> Any:
    """The sentence's text tokens ``[1, T]`` as ``Xtts.inference_stream`` makes them (lower-cased)."""
    import torch

    sentence = text.strip().lower()
    tokens = torch.IntTensor(model.tokenizer.encode(sentence, lang=language.split("-")[0])).unsqueeze(0)
    if tokens.shape[-1] >= model.args.gpt_max_text_tokens:
        raise ValueError("XTTS can only generate text with a maximum of 400 tokens")
    return tokens.to(model.device)


def _inline(fn: Callable[[], Any], urgent: bool) -> Any:
    return fn()


def decode_latents(model: Any, latents: Iterable[Any], speaker_embedding: Any, *, speed: float = 1.0,
                   first_chunk: int = FIRST_CHUNK_TOKENS, chunk: int = CHUNK_TOKENS,
                   stats: dict[str, int] | None = None,
                   run: Callable[[Callable[[], Any], bool], Any] = _inline,
                   ) -> Generator[Any, None, None]:
    """Audio chunks (1-D tensors) from GPT latents ``[1, C]`` as they come: the first after ``first_chunk``
    tokens, then every ``chunk``. The decoder's torch work goes through ``run(fn, urgent)`` (the engine's:
    on its torch thread, holding a slot of the core budget only while it runs), the first audio's
    urgent: a listener is waiting for it, and it is short."""
    decoder = IncrementalDecoder(model.hifigan_decoder, speaker_embedding, 1.0 / max(speed, 0.05))
    due = first_chunk
    heard = False  # no audio yielded yet: the next decode is the listener's first audio
    for latent in latents:
        decoder.push(latent)
        if decoder.source.tokens >= due and decoder.pending() > 0:
            audio = run(decoder.decode, not heard)
            if audio.numel():
                heard = True
                yield audio
                due = decoder.source.tokens + chunk
            else:  # all within the decoder's look-ahead (a fast speed): try again at the next token
                due = decoder.source.tokens + 1
    decoder.finish()
    audio = run(decoder.decode, not heard)
    if audio.numel():
        yield audio
    if stats is not None:
        stats["decoded_frames"] = stats.get("decoded_frames", 0) + decoder.decoded_frames
        stats["frames"] = stats.get("frames", 0) + decoder.source.available()
