"""A faster graph for Piper's single-threaded sessions: its 1-D convolutions as 2-D ones.

Piper's VITS decoder is a stack of 1-D convolutions, which onnxruntime runs through im2col and a
matrix product. Written as 2-D convolutions over an ``(N, C, 1, L)`` tensor, the same weights go
through onnxruntime's blocked-channel (NCHWc) convolution kernels instead: on one thread a sentence
takes ~18 % less time here (AVX-512), while a session with several threads gains nothing (those
kernels split a height-1 image poorly across threads), so only the one-core sessions use it.

The rewrite is exact up to float rounding: each ``Conv``/``ConvTranspose`` whose weight is a 3-D
initializer gets a 4-D weight and 2-D attributes, wrapped in ``Unsqueeze``/``Squeeze``; element-wise
ops between such convolutions run on the 4-D tensors directly, so the decoder stays 4-D from one
convolution to the next. `rewrite` and `split` write their graphs to files in a directory the engine
gives (sessions are made from files: onnxruntime keeps the bytes a session was made from for as long
as it lives) and return None when ``onnx`` is missing or the graph is not one they know; the engine
also compares the graphs' audio with the original's before it trusts them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

UNARY = frozenset({"LeakyRelu", "Relu", "Tanh", "Sigmoid"})
BINARY = frozenset({"Add", "Mul", "Sub", "Div"})
_AXES = "tts_gateway_unsqueeze_axes"


def rewrite(model_path: Path, directory: Path) -> Path | None:
    """The model with its 1-D convolutions as 2-D ones, written to ``directory``, or None (see the
    module docstring)."""
    try:
        import onnx
    except ImportError:
        log.info("onnx is not installed: Piper's one-core sessions run the original graph")
        return None
    model = onnx.load(str(model_path))
    return _save(model, directory / f"{model_path.stem}.2d.onnx") if _to_2d(model) else None


def with_durations(model_path: Path, directory: Path) -> Path | None:
    """The model with each phoneme id's length in frames (its ``Ceil``, the rounded durations the
    decoder is expanded by) as a second output, written to ``directory``; None when ``onnx`` is
    missing or the graph has no single such node. Word timings are read from it; the audio is unchanged."""
    try:
        import onnx
    except ImportError:
        log.info("onnx is not installed: Piper gives no word timings")
        return None
    model = onnx.load(str(model_path))
    ceilings = [node.output[0] for node in model.graph.node if node.op_type == "Ceil"]
    if len(ceilings) != 1 or len(model.graph.output) != 1:
        return None
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(ceilings[0]))
    return _save(model, directory / f"{model_path.stem}.durations.onnx")


def _save(model: Any, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def _to_2d(model: Any) -> bool:
    """Rewrite ``model`` (an onnx ModelProto) in place; False when there is nothing to rewrite."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if any(op.domain in ("", "ai.onnx") and op.version < 13 for op in model.opset_import):
        return False  # Unsqueeze/Squeeze take their axes as an input from opset 13 on
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}

    def scalar(name: str) -> bool:
        return name in weights and int(np.prod(weights[name].dims)) == 1

    nodes: list[onnx.NodeProto] = []
    twin: dict[str, str] = {}  # a 3-D tensor -> the same values as (N, C, 1, L)

    def as_4d(name: str) -> str:
        if name not in twin:
            twin[name] = f"{name}::4d"
            nodes.append(helper.make_node("Unsqueeze", [name, _AXES], [twin[name]]))
        return twin[name]

    def on_4d(node: onnx.NodeProto) -> None:
        """Run ``node`` on 4-D tensors; a ``Squeeze`` keeps its 3-D output for other consumers."""
        output = node.output[0]
        node.output[0] = f"{output}::4d"
        nodes.append(node)
        nodes.append(helper.make_node("Squeeze", [node.output[0], _AXES], [output]))
        twin[output] = node.output[0]

    convolutions = 0
    for node in graph.node:
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("Conv", "ConvTranspose") and weight is not None and len(weight.dims) == 3:
            array = numpy_helper.to_array(weight)
            weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array[:, :, None, :]), weight.name))
            for attribute in node.attribute:
                if attribute.name in ("kernel_shape", "strides", "dilations", "output_padding"):
                    values = list(attribute.ints)
                    del attribute.ints[:]
                    attribute.ints.extend([0 if attribute.name == "output_padding" else 1, *values])
                elif attribute.name == "pads":
                    begin, end = list(attribute.ints)
                    del attribute.ints[:]
                    attribute.ints.extend([0, begin, 0, end])
                elif attribute.name == "output_shape":
                    return False  # not produced by Piper's exporter; leave such graphs alone
            node.input[0] = as_4d(node.input[0])
            on_4d(node)
            convolutions += 1
        elif node.op_type in UNARY and node.input[0] in twin:
            node.input[0] = twin[node.input[0]]
            on_4d(node)
        elif (node.op_type in BINARY and any(name in twin for name in node.input)
              and all(name in twin or scalar(name) for name in node.input)):
            for index, name in enumerate(list(node.input)):
                node.input[index] = twin.get(name, name)
            on_4d(node)
        else:
            nodes.append(node)
    if not convolutions:
        return False

    # Drop what nothing reads any more (the Squeezes between 4-D neighbours).
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    graph.initializer.append(numpy_helper.from_array(np.array([2], dtype=np.int64), _AXES))
    del graph.node[:]
    graph.node.extend(kept)
    return True


@dataclass(frozen=True)
class SplitGraph:
    """A Piper voice in two graphs: ``encoder`` (phoneme ids, scales → latent frames, then the voice's
    other outputs if any: the text encoder, durations and flow) and ``decoder`` (latent frames →
    audio: HiFi-GAN, as 2-D convolutions, about two thirds of the work). A convolutional decoder can
    run on slices of the frames, so a sentence alone can be decoded on every core at once with one-core
    kernels. ``whole_decoder`` is the decoder as exported, for sentences too short to slice (its 1-D
    kernels share threads better)."""

    encoder: Path
    decoder: Path
    whole_decoder: Path
    latent: str  # the decoder's input


def split(model_path: Path, directory: Path) -> SplitGraph | None:
    """The voice as a `SplitGraph` of files in ``directory``, or None (no onnx; not a single-speaker
    Piper VITS graph)."""
    try:
        import onnx
        from onnx.utils import Extractor
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    first = next((node for node in model.graph.node if node.op_type == "Conv" and node.name.startswith("/dec/")),
                 None)
    if first is None:
        return None
    latent = first.input[0]
    extractor = Extractor(model)
    # The audio comes from the decoder; other outputs (the durations of `with_durations`) from the encoder.
    audio, *extra = [value.name for value in model.graph.output]
    encoder = extractor.extract_model([value.name for value in model.graph.input], [latent, *extra])
    decoder = extractor.extract_model([latent], [audio])
    # A multi-speaker decoder also reads the speaker embedding: such voices run whole.
    if [value.name for value in decoder.graph.input] != [latent]:
        return None
    whole = _save(decoder, directory / f"{model_path.stem}.decoder-1d.onnx")
    if not _to_2d(decoder):
        return None
    _to_2d(encoder)  # its flow's convolutions gain too (with masks between them they stay 3-D there)
    return SplitGraph(_save(encoder, directory / f"{model_path.stem}.encoder.onnx"),
                      _save(decoder, directory / f"{model_path.stem}.decoder.onnx"), whole, latent)
