"""The kernels XTTS's GPT and its HiFi-GAN decoder run on: chosen at load, by measuring on this machine.

XTTS's GPT is transformers' GPT-2, whose projections are ``Conv1D`` modules (``x @ W + b``), which
PyTorch's dynamic quantization and oneDNN do not know. Here they become ``nn.Linear`` (the same weights,
transposed): on a CPU that alone made a real-size sentence ~25 % faster (issue 31's figures), and it
opens the two other kernels:

* ``fp32`` (default): the fastest, measured at load on a batched step, of PyTorch's default GEMM (MKL on
  x86), oneDNN on plain weights (``torch.utils.mkldnn``) and oneDNN on weights packed once into its own
  blocked layout (the ops PyTorch's compiler uses for CPU linear layers) — the default GEMM gains little
  from a few rows on some CPUs; ``torch.utils.mkldnn`` converts its plain weights on every call, which
  costs about what the product does; packed weights do not (24 layers of 1024 × 4096, 4 rows, 2 threads
  here: 39, 16 and 9 ms). Which one wins depends on the CPU and the PyTorch build, so the machine decides.
* ``int8`` (``TTS_GATEWAY_XTTS_PRECISION=int8``, opt-in): dynamic int8 quantization of those linear layers,
  several times faster on a CPU, with a small numeric error whose effect on real voices could not be heard
  here (no real weights): measure it on yours with ``tts-gateway dev compare-precision``. The quantized
  kernels are measured at load too, on the projections of the first blocks (quantizing the whole GPT
  takes seconds per kernel): fbgemm and oneDNN (each a PyTorch quantization engine; oneDNN uses AMX's
  int8 tiles where the CPU has them), each with one scale per weight tensor and one per output channel.
  Per channel is the more faithful, so it is kept unless per tensor is more than 5 % faster.

The decoder's weight norms are folded once (`fold_weight_norm`), and its convolutions run plain or
channels-last (`to_channels_last`), whichever decodes a chunk faster at load.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")


def linearize(gpt: Any) -> int:
    """Replace every ``Conv1D`` of the GPT-2 blocks by an equivalent ``nn.Linear``; returns how many."""
    import torch
    from torch import nn

    replaced = 0
    for owner, name in _linears(gpt):
        conv = getattr(owner, name)
        if isinstance(conv, nn.Linear) or not hasattr(conv, "nf"):
            continue
        weight = conv.weight  # [in, out]
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        setattr(owner, name, linear)
        replaced += 1
    return replaced


def fold_weight_norm(module: Any) -> int:
    """Compute each weight-normalised weight of ``module`` once and keep it; returns how many.

    XTTS's HiFi-GAN decoder keeps training's weight norm (``parametrizations.weight_norm``), which recomputes
    every convolution's weight on every call (coqui's own ``remove_weight_norm`` stops at the one convolution
    XTTS builds without it). Folded, a real-size decoder takes ~30 % less time, the same bytes out.
    """
    from torch.nn.utils import parametrize

    folded = 0
    for child in module.modules():
        if parametrize.is_parametrized(child, "weight"):
            parametrize.remove_parametrizations(child, "weight", leave_parametrized=True)
            folded += 1
    return folded


def _convolutions(decoder: Any) -> list[Any]:
    """The HiFi-GAN's 1-D convolutions and transposed convolutions."""
    from torch import nn

    return [m for m in decoder.modules() if type(m) in (nn.Conv1d, nn.ConvTranspose1d)]


def to_channels_last(decoder: Any) -> int:
    """Run each 1-D convolution of ``decoder`` as a 2-D one on channels-last data; returns how many.

    oneDNN's convolutions on plain ``[N, C, L]`` data are slower than on channels-last ``[N, L, C]``
    (here 1.2–1.6× for the decoder's largest layers); seen as ``[N, C, 1, L]`` with channels-last weights,
    a layer gives its output channels-last, and the element-wise steps between layers (activations, sums)
    keep that layout, so the data is converted once, at the first layer. The weights are kept once, in
    the new layout (the modules' own weights become views of them). Weight norms must be folded first."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    converted = 0
    for layer in _convolutions(decoder):
        if parametrize.is_parametrized(layer, "weight") or getattr(layer, "nwc_weight", None) is not None:
            continue
        weight = layer.weight.detach()[:, :, None].contiguous(memory_format=torch.channels_last)
        layer.register_buffer("nwc_weight", weight, persistent=False)
        layer.weight = nn.Parameter(weight.squeeze(2), requires_grad=False)  # the same memory
        layer.forward = functools.partial(convolve, layer)
        converted += 1
    return converted


def convolve(layer: Any, x: Any, padding: int | None = None, weight: Any = None) -> Any:
    """``layer``'s (``Conv1d`` or ``ConvTranspose1d``) convolution of ``x`` ``[N, C, L]`` or ``[C, L]``, on the
    layout chosen at load (`to_channels_last`): with ``padding`` instead of its own, or ``weight`` (plain
    layout only)."""
    import torch.nn.functional as F
    from torch import nn

    pad = layer.padding[0] if padding is None else padding
    transposed = isinstance(layer, nn.ConvTranspose1d)
    nwc = getattr(layer, "nwc_weight", None)
    if nwc is None:
        weight = layer.weight if weight is None else weight
        if transposed:
            return F.conv_transpose1d(x, weight, layer.bias, layer.stride, pad, layer.output_padding, layer.groups,
                                      layer.dilation)
        return F.conv1d(x, weight, layer.bias, layer.stride, pad, layer.dilation, layer.groups)
    if x.dim() == 2:  # unbatched [C, L], as nn.Conv1d accepts (coqui's decoder passes one)
        return convolve(layer, x[None], padding)[0]
    if transposed:
        y = F.conv_transpose2d(x.unsqueeze(2), nwc, layer.bias, (1, layer.stride[0]), (0, pad),
                               (0, layer.output_padding[0]), layer.groups, (1, layer.dilation[0]))
    else:
        y = F.conv2d(x.unsqueeze(2), nwc, layer.bias, (1, layer.stride[0]), (0, pad), (1, layer.dilation[0]),
                     layer.groups)
    return y.squeeze(2)


def prepare_decoder(decoder: Any, probe: Callable[[], None], rounds: int = 3) -> dict[str, Any]:
    """Fold ``decoder``'s weight norms, then keep the faster of its plain and channels-last convolutions,
    measured by ``probe()`` (one decode); returns what was chosen and the milliseconds of each."""
    import torch

    report: dict[str, Any] = {"decoder_weight_norms_folded": fold_weight_norm(decoder)}
    if next(decoder.parameters()).device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return {**report, "decoder_layout": "plain"}
    with torch.inference_mode():
        measured = {"plain": _fastest_ms(probe, rounds)}
        to_channels_last(decoder)
        try:
            measured["channels-last"] = _fastest_ms(probe, rounds)
        except RuntimeError as exc:  # a build without channels-last convolutions
            log.info("XTTS's decoder cannot run channels-last (%s)", exc)
    layout = min(measured, key=measured.__getitem__)  # plain on a tie
    if layout == "plain":
        to_plain(decoder)
    return {**report, "decoder_layout": layout, **{f"decoder_{k}": ms for k, ms in _reported(measured).items()}}


def to_plain(decoder: Any) -> None:
    """Undo `to_channels_last` (the weights back in their own layout)."""
    from torch import nn

    for layer in _convolutions(decoder):
        if getattr(layer, "nwc_weight", None) is None:
            continue
        layer.weight = nn.Parameter(layer.weight.detach().contiguous(), requires_grad=False)
        del layer.nwc_weight
        del layer.forward


def _linears(gpt: Any) -> list[tuple[Any, str]]:
    """(module, attribute) of every projection of the GPT-2 blocks."""
    return [(owner, name) for block in gpt.gpt.h
            for owner, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                (block.mlp, "c_proj"))]


def _replace_linears(gpt: Any, make: Callable[[Any], Any]) -> None:
    """Each ``nn.Linear`` projection of the GPT-2 blocks replaced by ``make(layer)``."""
    from torch import nn

    for owner, name in _linears(gpt):
        layer = getattr(owner, name)
        if isinstance(layer, nn.Linear):
            setattr(owner, name, make(layer))


INT8_KERNELS = ("fbgemm", "fbgemm-per-channel", "onednn", "onednn-per-channel")
PER_TENSOR_MARGIN = 1.05  # per tensor is kept only when this much faster than the best per channel
INT8_PROBE_BLOCKS = 4  # the int8 kernels are timed on the projections of this many GPT-2 blocks


def _quantized(layer: Any, kernel: str) -> Any:
    """``layer`` (an ``nn.Linear``) quantized dynamically to int8 on ``kernel`` (one of `INT8_KERNELS`: a
    PyTorch quantization engine, per tensor or ``-per-channel``). The weight is packed for that engine; a
    packed layer keeps its engine whatever the process-wide setting is afterwards."""
    import torch
    from torch import nn
    from torch.ao import quantization

    engine, _, granularity = kernel.partition("-")
    if kernel not in INT8_KERNELS or engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"no int8 kernel {kernel!r} in this PyTorch build")
    qconfig = quantization.per_channel_dynamic_qconfig if granularity else quantization.default_dynamic_qconfig
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        quantized = quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear: qconfig}, dtype=torch.qint8)[0]
    finally:
        torch.backends.quantized.engine = previous
    # Its forward calls the op through ``torch.ops``' overload packet, which walks the arguments in Python on
    # every call (120 calls a GPT step): the op's one overload, called straight, computes the same.
    op = torch.ops.quantized.linear_dynamic.default
    packed = quantized._packed_params._packed_params
    reduce_range = not (quantized.version is None or quantized.version < 4)
    quantized.forward = lambda x: op(x, packed, reduce_range).to(x.dtype)
    return quantized


def quantize_int8(gpt: Any, kernel: str) -> None:
    """Dynamic int8 quantization of the GPT-2 blocks' linear layers on ``kernel`` (see `_quantized`)."""
    _replace_linears(gpt, lambda layer: _quantized(layer, kernel))


def _fastest_ms(run: Callable[[], Any], rounds: int) -> float:
    """Milliseconds of ``run``'s fastest of ``rounds`` runs, after one that warms up (the first call
    allocates and packs). The fastest: a kernel is as fast as its best run; a busy machine only ever slows
    one down (a median of three still picked the slower kernel on a noisy host)."""
    run()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return min(samples) * 1000


def _through(layers: list[Any], inputs: list[Any]) -> None:
    for layer, x in zip(layers, inputs, strict=True):
        layer(x)


def _time_int8(gpt: Any, rows: int, rounds: int) -> dict[str, float]:
    """Milliseconds for ``rows`` rows through the projections of the first `INT8_PROBE_BLOCKS` blocks, on each
    int8 kernel this build has. Only the projections change with the kernel, and quantizing a few blocks
    takes a fraction of the seconds quantizing the whole GPT does (measured: ~5 s per kernel at real size)."""
    import torch

    layers = [getattr(owner, name) for owner, name in _linears(gpt)[:4 * INT8_PROBE_BLOCKS]]  # 4 a block
    inputs = [torch.randn(rows, layer.in_features) for layer in layers]
    measured: dict[str, float] = {}
    for kernel in INT8_KERNELS:
        try:
            quantized = [_quantized(layer, kernel) for layer in layers]
        except RuntimeError as exc:  # a build without this engine
            log.info("XTTS's GPT cannot use int8 %s (%s)", kernel, exc)
            continue
        measured[kernel] = _fastest_ms(functools.partial(_through, quantized, inputs), rounds)
    return measured


def _packed_linear(layer: Any, rows: int) -> Any:
    """``layer`` (an ``nn.Linear``) on a weight packed once for oneDNN's inner product, for about ``rows``
    rows (any number works); a module like ``torch.utils.mkldnn``'s, with the packed weight as a buffer."""
    import torch
    from torch import nn

    linear = torch.ops.mkldnn._linear_pointwise.default  # the overload itself (see `_quantized`)

    class PackedLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows))
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

        def forward(self, x: Any) -> Any:
            return linear(x.contiguous(), self.weight, self.bias, "none", [], "")

    return PackedLinear()


def to_packed(gpt: Any, rows: int) -> None:
    """The linear layers through oneDNN on weights packed for ``rows`` rows."""
    _replace_linears(gpt, lambda layer: _packed_linear(layer, rows))


def to_onednn(gpt: Any) -> None:
    """The linear layers through oneDNN (``torch.utils.mkldnn``; dense tensors in and out)."""
    import torch.utils.mkldnn
    from torch import nn

    _replace_linears(gpt, lambda layer: torch.utils.mkldnn.to_mkldnn(nn.Sequential(layer))[0])


def _restore(gpt: Any, saved: dict[tuple[int, str], Any]) -> None:
    for owner, name in _linears(gpt):
        setattr(owner, name, saved[(id(owner), name)])


def prepare(gpt: Any, precision: str, step: Callable[[int], None], *, batch: int = 4, pack_rows: int = 8,
            rounds: int = 5) -> dict[str, Any]:
    """Put the GPT on its kernels for ``precision``; ``step(n)`` runs one batched GPT step of ``n`` rows
    (``batch`` of them to measure); packed weights are laid out for ``pack_rows`` rows (the batch limit).

    Returns what was chosen and measured (milliseconds per step, unrounded: the choice can be checked
    against them), for the log and the engine's description.
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    linearize(gpt)
    on_cpu = next(gpt.parameters()).device.type == "cpu"
    if precision == "fp32" and (not torch.backends.mkldnn.is_available() or not on_cpu):
        return {"precision": "fp32", "kernel": "default"}

    measured: dict[str, float] = {}
    if precision == "int8":
        if not on_cpu:  # PyTorch's dynamically quantized layers exist for the CPU only
            raise RuntimeError("TTS_GATEWAY_XTTS_PRECISION=int8 runs on the CPU only; use fp32 on a GPU")
        with torch.inference_mode():
            measured = _time_int8(gpt, batch, rounds * 4)  # a round takes milliseconds: more of them
        if not measured:
            raise RuntimeError("no int8 kernel for XTTS's GPT works in this PyTorch build")
        kernel = choose_kernel(measured)
        quantize_int8(gpt, kernel)
        return {"precision": "int8", "kernel": kernel, "batch": batch,
                "measured_on": f"projections of {INT8_PROBE_BLOCKS} blocks", **_reported(measured)}
    converters: dict[str, Callable[[Any], None]] = {
        "default": lambda g: None, "onednn": to_onednn, "onednn-packed": lambda g: to_packed(g, pack_rows)}
    with torch.inference_mode():
        saved = {(id(owner), name): getattr(owner, name) for owner, name in _linears(gpt)}
        in_place = ""  # the kernel the layers are on (a failed conversion may have left some)
        for kernel, convert in converters.items():
            _restore(gpt, saved)  # conversions start from the linear layers
            in_place = kernel
            try:
                convert(gpt)
                measured[kernel] = _fastest_ms(lambda: step(batch), rounds)
            except (AttributeError, RuntimeError) as exc:  # a build without oneDNN's linear or its packed ops
                log.info("XTTS's GPT cannot use %s (%s)", kernel, exc)
        kernel = choose_kernel(measured)
        if kernel != in_place:  # the last one measured, when it wins, is kept as converted
            _restore(gpt, saved)
            converters[kernel](gpt)
    return {"precision": "fp32", "kernel": kernel, "batch": batch, **_reported(measured)}


def _reported(measured: dict[str, float]) -> dict[str, float]:
    """Each kernel's milliseconds under a key of its own (``onednn-packed`` → ``onednn_packed_ms``)."""
    return {f"{name.replace('-', '_')}_ms": ms for name, ms in measured.items()}


def choose_kernel(measured: dict[str, float]) -> str:
    """The fastest kernel; among int8 ones, the fastest per channel unless per tensor beats it by more
    than `PER_TENSOR_MARGIN` (one scale per output channel follows each row's weights more closely)."""
    fastest = min(measured, key=measured.__getitem__)
    per_channel = [kernel for kernel in measured if kernel.endswith("-per-channel")]
    if not per_channel:
        return fastest
    best_channel = min(per_channel, key=measured.__getitem__)
    return best_channel if measured[best_channel] <= measured[fastest] * PER_TENSOR_MARGIN else fastest


__all__ = ["INT8_KERNELS", "PRECISIONS", "choose_kernel", "fold_weight_norm", "linearize", "prepare",
           "quantize_int8", "to_onednn", "to_packed"]
