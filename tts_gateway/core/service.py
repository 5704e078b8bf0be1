"""The synthesis service: voices → engines → sentences → resampled, encoded bytes.

Framework-free: the gateway validates HTTP input, then calls `plan` (cheap, raises domain errors)
and runs `run` in a worker thread. Nothing here imports Litestar or model code.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from tts_gateway.audio import FORMATS, AudioFormat, Encoder, Resampler, media_type, silence
from tts_gateway.config import Settings
from tts_gateway.core.captions import CAPTION_FORMATS
from tts_gateway.core.frontend import Spoken, prepare
from tts_gateway.core.metrics import Metrics
from tts_gateway.core.text_limits import check_text
from tts_gateway.core.timings import LEVELS, TimedBytes, TimingClock
from tts_gateway.core.word_map import WordMap, build_word_map
from tts_gateway.engines.base import (
    SpeechEngine,
    SynthesisCancelled,
    SynthesisOptions,
    TimingEngine,
    UnsupportedLanguage,
    match_language,
    timestamp_levels,
)
from tts_gateway.engines.manager import EngineManager
from tts_gateway.engines.timing import WORD, TimedChunk, WordTiming
from tts_gateway.errors import InvalidField, TTSGatewayError, Unavailable
from tts_gateway.text import split_sentences
from tts_gateway.voices.catalog import ResolvedVoice, VoiceCatalog
from tts_gateway.voices.lexicon import Lexicon, LexiconEntry

log = logging.getLogger(__name__)

SENTENCE_PAUSE_S = 0.2
MIN_RATE, MAX_RATE = 8000, 48000
MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_SEED = 2**32 - 1


# Sentences of one request started ahead, for engines that share the cores themselves
# (`Capabilities.parallel_pieces`); the audio still comes out in order. Twice the cores: the engine's
# budget runs as many as there are cores, and when a later sentence finishes before an earlier one,
# the next is already queued for the core it frees instead of waiting for the earlier one to be sent.
PIECE_WINDOW = min(2 * (os.cpu_count() or 1), 8)
_END = object()


class Turn(Protocol):
    """A request's admission slot: a stream passes it on between sentences when others wait."""

    def crowded(self) -> bool: ...

    def pass_on(self, cancel: threading.Event) -> None: ...

    def lent(self, cancel: threading.Event) -> AbstractContextManager[None]: ...


class _OrderedPieces:
    """Runs up to ``window`` pieces ahead in threads and hands their chunks over in order.

    With a window of 1 the pieces run inline, one after the other, in the caller's thread; with a
    ``turn`` too, the request gives way between sentences while others wait: it passes its slot on
    and queues again (round-robin per sentence).
    """

    def __init__(self, make: Callable[[int], Iterator[TimedChunk]], pieces: list[str], window: int,
                 cancel: threading.Event, turn: Turn | None = None) -> None:
        self.make = make
        self.pieces = pieces
        self.window = max(1, window)
        self.cancel = cancel
        self.turn = turn
        self.queues: dict[int, queue.Queue[Any]] = {}
        self.next_start = 0
        self.threads: list[threading.Thread] = []
        while self.window > 1 and self.next_start < min(self.window, len(pieces)):
            self._start()

    def _start(self) -> None:
        index = self.next_start
        self.next_start += 1
        out: queue.Queue[Any] = queue.Queue()
        self.queues[index] = out

        def produce() -> None:
            try:
                for chunk in self.make(index):
                    out.put(chunk)
                    if self.cancel.is_set():
                        break
                out.put(_END)
            except BaseException as exc:  # raised in the consumer's thread
                out.put(exc)

        thread = threading.Thread(target=produce, name=f"tts-piece-{index}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def chunks(self, index: int) -> Iterator[TimedChunk]:
        if self.window == 1:
            yield from self.make(index)
            if self.turn is not None and index + 1 < len(self.pieces):
                self.turn.pass_on(self.cancel)
            return
        out = self.queues.pop(index)
        while True:
            item = out.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        while self.next_start < min(index + 1 + self.window, len(self.pieces)) and not self.cancel.is_set():
            self._start()

    def close(self) -> None:
        """Stop the pieces still running (the request ended, failed or went away)."""
        if any(thread.is_alive() for thread in self.threads):
            self.cancel.set()


@dataclass
class SynthesisRequest:
    text: str
    voice: str | None = None
    language: str | None = None
    format: str = "wav"
    sample_rate: int | None = None
    speed: float = 1.0
    seed: int | None = None
    stream: bool = False
    cache: bool = True
    text_format: str = "text"
    normalize: bool = True
    timestamps: str | None = None  # "word" or "sentence": the answer carries timings (`core.timings`)
    captions: str | None = None  # "vtt" or "srt", built from the timings


@dataclass
class Plan:
    engine_name: str
    engine: SpeechEngine
    voice: ResolvedVoice
    language: str
    pieces: list[str]
    fmt: AudioFormat
    rate: int
    speed: float
    seed: int
    repeatable: bool
    stream: bool
    text: str = ""
    cache: bool = True
    timestamps: str | None = None
    captions: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # Per piece, from the text front end (empty: the usual pause, the request's speed and language):
    # the silence before it (None: the usual pause between sentences), its speed factor and language.
    pauses: list[float | None] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    end_pause: float = 0.0  # silence after the last piece (an SSML break at the end)
    lexicon: tuple[str, ...] = ()  # the words the lexicon respelled
    words: WordMap | None = None  # with timestamps: the spoken words → the input's words

    def pause_before(self, index: int) -> float | None:
        """Seconds of exact silence before piece ``index``; None for the usual pause between sentences."""
        if index < len(self.pauses) and self.pauses[index] is not None:
            return self.pauses[index]
        return None if index else 0.0

    def piece_speed(self, index: int) -> float:
        rate = self.rates[index] if index < len(self.rates) else 1.0
        return min(MAX_SPEED, max(MIN_SPEED, self.speed * rate))

    def piece_language(self, index: int) -> str:
        return self.languages[index] if index < len(self.languages) else self.language

    @property
    def streams(self) -> bool:
        """Whether bytes really leave before the end (FLAC and MP3 are always sent whole)."""
        return self.stream and self.fmt.incremental

    def cache_parts(self) -> dict[str, Any] | None:
        """Everything that changes the bytes, or None when the result is not repeatable."""
        deterministic = self.engine.capabilities.deterministic
        if not self.cache or not (self.repeatable or deterministic):
            return None
        model = self.engine.model
        return {
            "v": 2, "engine": self.engine_name, "model": model.sha256 or model.id,
            "voice": self.voice.voice_sha256 or self.voice.name, "text": self.pieces,  # as spoken
            "pauses": self.pauses, "rates": self.rates, "languages": self.languages, "end_pause": self.end_pause,
            "language": self.language, "format": self.fmt.name, "rate": self.rate, "speed": self.speed,
            "seed": None if deterministic else self.seed, "stream": self.streams,
            # Timed audio of some engines comes another way (espeak-ng's library): never mixed with untimed.
            # Timings name the words as written: "$42" and "42 dollars" sound alike but are timed apart.
            **({"timestamps": self.timestamps, "written": self.text} if self.timestamps else {}),
        }

    @property
    def media_type(self) -> str:
        return media_type(self.fmt, self.rate)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-Engine": self.engine_name,
            "X-Voice": self.voice.name,
            "X-Seed": str(self.seed),
            "X-Sample-Rate": str(self.rate),
        }
        sha = self.engine.model.sha256
        if sha:
            headers["X-Model-Sha256"] = sha
        if self.voice.voice_sha256:
            headers["X-Voice-Sha256"] = self.voice.voice_sha256
        if self.lexicon:
            headers["X-Lexicon"] = ", ".join(quote(word, safe=" '.-") for word in self.lexicon)
        return headers


def check_timings(engine: SpeechEngine, name: str, timestamps: str | None, captions: str | None) -> str | None:
    """The timestamp level a request gets: the one it asks for when its engine gives it; captions alone
    ask for the finest the engine gives. Raises `InvalidField`."""
    if captions is not None and captions not in CAPTION_FORMATS:
        raise InvalidField("captions", f"{captions!r} is not one of {', '.join(CAPTION_FORMATS)}")
    if timestamps is None:
        return timestamp_levels(engine)[0] if captions is not None else None
    if timestamps not in LEVELS:
        raise InvalidField("timestamps", f"{timestamps!r} is not one of {', '.join(LEVELS)}")
    levels = timestamp_levels(engine)
    if timestamps not in levels:
        raise InvalidField("timestamps", f"engine {name!r} gives {' and '.join(levels)} timestamps, not {timestamps}")
    return timestamps


class SynthesisService:
    """Plans and runs syntheses; voices come from the `VoiceCatalog`, engines from the manager.

    Args:
        settings: Limits (text length) are read from here.
        engines: The engine manager.
        voices: Resolves voice names to built-ins or verified latents.
        metrics: Where timings and counts go.
    """

    def __init__(self, settings: Settings, engines: EngineManager, voices: VoiceCatalog, metrics: Metrics,
                 lexicon: Lexicon | None = None) -> None:
        self.settings = settings
        self.engines = engines
        self.voices = voices
        self.metrics = metrics
        self.lexicon = lexicon

    # -- synthesis ------------------------------------------------------------------------------
    def check_text(self, text: str) -> None:
        """Refuse text that is empty, too long or too costly (`text_limits.check_text`)."""
        check_text(text, self.settings.max_text_chars)

    def check_options(self, fmt: str, sample_rate: int | None, speed: float, seed: int | None) -> AudioFormat:
        audio_format = FORMATS.get(fmt)
        if audio_format is None:
            raise InvalidField("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
        if sample_rate is not None:
            if not MIN_RATE <= sample_rate <= MAX_RATE:
                raise InvalidField("sample_rate", f"must be between {MIN_RATE} and {MAX_RATE}, got {sample_rate}")
            problem = audio_format.check_rate(sample_rate)
            if problem:
                raise InvalidField("sample_rate", problem)
        if not (MIN_SPEED <= speed <= MAX_SPEED):  # also false for NaN
            raise InvalidField("speed", f"must be between {MIN_SPEED} and {MAX_SPEED}, got {speed}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidField("seed", f"must be between 0 and {MAX_SEED}")
        return audio_format

    def plan(self, request: SynthesisRequest, voice: ResolvedVoice | None = None) -> Plan:
        """Validate everything that can be checked before work starts; raises domain errors."""
        self.check_text(request.text)
        audio_format = self.check_options(request.format, request.sample_rate, request.speed, request.seed)
        resolved = voice or self.voices.resolve(request.voice)
        engine = self.engines.check_available(resolved.engine)
        try:
            language = match_language(engine, request.language or resolved.language or engine.languages[0])
        except UnsupportedLanguage as exc:
            speakers = self._speakers_of(exc.language)
            if speakers:
                exc.detail = f"{exc.detail}; voices that speak it: {', '.join(speakers)}"
            raise
        rate = request.sample_rate or audio_format.default_rate(engine.sample_rate)
        timestamps = check_timings(engine, resolved.engine, request.timestamps, request.captions)
        spoken = self.speak(request.text, language, engine, resolved, text_format=request.text_format,
                            normalize=request.normalize)
        pieces: list[str] = []
        pauses: list[float | None] = []
        rates: list[float] = []
        languages: list[str] = []
        for segment in spoken.segments:
            segment_language = segment.language or language
            split = split_sentences(segment.text, segment_language, engine.max_chars(segment_language))
            for number, piece in enumerate(split):
                pieces.append(piece)
                pauses.append(segment.pause_before if number == 0 else None)
                rates.append(segment.rate)
                languages.append(segment_language)
        if not pieces:
            raise InvalidField("text", "has nothing to speak")
        words = self._word_map(spoken, pieces, language, engine, resolved, request.normalize) if timestamps else None
        styled = any(p is not None for p in pauses) or any(r != 1.0 for r in rates) or \
            any(code != language for code in languages) or spoken.pause_after
        return Plan(
            engine_name=resolved.engine, engine=engine, voice=resolved, language=language, pieces=pieces,
            fmt=audio_format, rate=rate, speed=request.speed,
            seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
            repeatable=request.seed is not None, stream=request.stream, text=request.text, cache=request.cache,
            pauses=pauses if styled else [], rates=rates if styled else [], languages=languages if styled else [],
            end_pause=spoken.pause_after, lexicon=spoken.lexicon, timestamps=timestamps, captions=request.captions,
            words=words,
        )

    def _word_map(self, spoken: Spoken, pieces: list[str], language: str, engine: SpeechEngine,
                  voice: ResolvedVoice, normalize: bool) -> WordMap:
        """How the words of ``pieces`` map back to the words as written (`core.word_map`)."""
        entries = self._entries(voice)(language) if self.lexicon is not None else {}
        phonemes = engine.capabilities.phonemes

        def expand(word: str) -> str:  # a written word as the front end says it alone
            return prepare(word, language, normalize_text=normalize, lexicon=lambda _: entries,
                           phonemes=phonemes).text

        return build_word_map(spoken.written, pieces, expand)

    def speak(self, text: str, language: str, engine: SpeechEngine, voice: ResolvedVoice, *,
              text_format: str = "text", normalize: bool = True) -> Spoken:
        """``text`` as ``engine`` will be given it (the text front end, with the preset's and the gateway's lexicon)."""
        def speaks(code: str) -> str | None:  # asked only for SSML's <lang>
            try:
                matched = match_language(engine, code)
            except UnsupportedLanguage:
                return None
            if voice.input.builtin is None:  # a preset speaks every language of its engine
                return matched
            # A built-in voice speaks its own languages, not all its engine's.
            found = next((v for v in engine.voices() if v.id == voice.input.builtin), None)
            own = list(found.languages or (found.language,)) if found else []
            if matched in own:
                return matched
            return next((c for c in own if c.split("-")[0] == matched.split("-")[0]), None)

        return prepare(text, language, text_format=text_format, normalize_text=normalize,
                       lexicon=self._entries(voice) if self.lexicon is not None else None, speaks=speaks,
                       phonemes=engine.capabilities.phonemes)

    def _entries(self, voice: ResolvedVoice) -> Callable[[str], dict[str, LexiconEntry]]:
        lexicon = self.lexicon
        assert lexicon is not None

        def entries(language: str) -> dict[str, LexiconEntry]:
            found = lexicon.entries(language)
            if not voice.builtin:  # a preset's own entries win over the gateway's
                found.update(lexicon.entries(language, scope=voice.name))
            return found

        return entries

    def _speakers_of(self, language: str) -> list[str]:
        """A few voices that speak ``language`` (for a hint when the chosen one does not)."""
        base = language.strip().lower().replace("_", "-").split("-")[0]
        try:
            voices = self.voices.all(partial=True)
        except TTSGatewayError:
            return []
        def speaks(codes: list[str]) -> bool:
            return any(str(code).lower().split("-")[0] == base for code in codes)

        own = [v["name"] for v in voices if speaks([v.get("language") or ""])]  # its own language first
        also = [v["name"] for v in voices if v["name"] not in own and speaks(v.get("languages") or [])]
        return (own + also)[:3]

    def run(self, plan: Plan, cancel: threading.Event, on_piece: Callable[[int], None] | None = None,
            turn: Turn | None = None) -> Iterator[bytes]:
        """Synthesize piece by piece, yielding encoded bytes as they are ready (worker thread).

        ``turn``: the request's admission slot; a streamed request passes it on between sentences
        when others wait for one, and while other requests are in flight each sentence takes one core.
        """
        for item in self.run_timed(plan, cancel, on_piece, turn):
            if item.audio:
                yield item.audio

    def run_timed(self, plan: Plan, cancel: threading.Event, on_piece: Callable[[int], None] | None = None,
                  turn: Turn | None = None) -> Iterator[TimedBytes]:
        """`run`, each part of the audio with the timings of what it holds (when ``plan.timestamps`` asks
        for them; the last item carries the whole duration). Items may have no audio: the timings of a
        sentence come when it ends, and whole formats are encoded at the end."""
        encoder = Encoder(plan.fmt, plan.rate, streaming=plan.stream)
        pieces: _OrderedPieces | None = None
        started = time.perf_counter()
        produced = 0
        first = True
        timed = plan.timestamps is not None
        try:
            with self.engines.use(plan.engine_name) as engine:
                native_speed = engine.capabilities.native_speed
                options = SynthesisOptions(
                    language=plan.language, speed=plan.speed if native_speed else 1.0, seed=plan.seed,
                    cancel=cancel, repeatable=plan.repeatable, streaming=plan.stream,
                    lend=None if turn is None else (lambda: turn.lent(cancel)),
                )
                rate = engine.sample_rate
                resample = Resampler(rate, plan.rate)
                # A whole response comes soonest with its sentences side by side, one core each. A
                # stream's listener waits for each sentence in turn: alone, it gets every core and the
                # engine's one warm session; under load, streams take turns sentence by sentence.
                parallel = engine.capabilities.parallel_pieces and not plan.streams and len(plan.pieces) > 1
                window = PIECE_WINDOW if parallel else 1
                last = len(plan.pieces) - 1
                words = plan.timestamps == WORD and isinstance(engine, TimingEngine)

                def make(index: int) -> Iterator[TimedChunk]:
                    # The last sentence has no later one to share the cores with: if the others are done
                    # when its turn comes, it may have them all, unless other requests are about to.
                    alone = index == last or window == 1
                    crowded = turn is not None and turn.crowded()
                    chosen = options if alone and not crowded else replace(options, side_by_side=True)
                    speed, language = plan.piece_speed(index), plan.piece_language(index)
                    if (native_speed and speed != chosen.speed) or language != chosen.language:
                        chosen = replace(chosen, speed=speed if native_speed else 1.0, language=language)
                    if words:
                        assert isinstance(engine, TimingEngine)
                        return engine.synthesize_timed(plan.pieces[index], plan.voice.input, chosen)
                    return (TimedChunk(chunk) for chunk in engine.synthesize(plan.pieces[index], plan.voice.input,
                                                                             chosen))

                def emit(audio: np.ndarray) -> bytes:
                    """Engine-rate audio, counted, resampled and encoded (the first bytes time the TTFA)."""
                    nonlocal produced, first
                    produced += audio.size
                    out = encoder.feed(resample(audio))
                    if out and first:
                        self.metrics.ttfa.labels(plan.engine_name).observe(time.perf_counter() - plan.started)
                        first = False
                    return out

                def pause(seconds: float) -> bytes:
                    """Exact silence (an SSML break), whatever the speed; the clock counts it."""
                    block = silence(rate, seconds)
                    clock.emitted += block.size
                    return emit(block)

                pieces = _OrderedPieces(make, plan.pieces, window, cancel, turn=turn if plan.streams else None)
                clock = TimingClock(rate)
                # Engines time the words they speak; the answer names the words as written.
                reader = plan.words.reader() if words and plan.words is not None else None

                def written(heard: tuple[WordTiming, ...]) -> tuple[WordTiming, ...]:
                    return reader.feed(heard) if reader is not None else heard if words else ()
                for index in range(len(plan.pieces)):
                    if cancel.is_set():
                        raise SynthesisCancelled("cancelled")
                    exact = plan.pause_before(index)
                    if exact is not None and exact > 0:
                        out = pause(exact)
                        if out:
                            yield TimedBytes(out)
                    # The usual pause between sentences is stretched with the sentence when the speed is.
                    block = clock.start_piece(silence(rate, SENTENCE_PAUSE_S) if exact is None else None)
                    for chunk in pieces.chunks(index):
                        if cancel.is_set():
                            raise SynthesisCancelled("cancelled")
                        block.add(chunk)
                        if native_speed:
                            audio, heard = block.take()
                            out = emit(audio)
                            heard = written(heard)
                            if out or (timed and heard):
                                yield TimedBytes(out, heard)
                    if on_piece is not None:
                        on_piece(index + 1)
                    heard = ()
                    out = b""
                    if block.pending:
                        audio, heard = block.take(1.0 if native_speed else plan.piece_speed(index))
                        out = emit(audio)
                    heard = written(heard)
                    if reader is not None:
                        heard += reader.end_piece(index)
                    sentence = block.sentence(plan.words.sentences[index] if plan.words else plan.pieces[index])
                    if out or timed:
                        yield TimedBytes(out, heard, (sentence,) if timed else ())
                ending = pause(plan.end_pause) if plan.end_pause > 0 else b""
                tail = ending + encoder.feed(resample(np.zeros(0, np.float32), last=True)) + encoder.close()
                if first:
                    self.metrics.ttfa.labels(plan.engine_name).observe(time.perf_counter() - plan.started)
                elapsed = time.perf_counter() - started
                seconds = produced / rate
                self.metrics.synthesis_seconds.labels(plan.engine_name).observe(elapsed)
                self.metrics.audio_seconds.labels(plan.engine_name).inc(seconds)
                if seconds > 0:
                    self.metrics.rtf.labels(plan.engine_name).observe(elapsed / seconds)
                if tail or timed:
                    yield TimedBytes(tail, reader.finish() if reader is not None else (), duration=seconds)
        except TTSGatewayError:
            raise
        except Exception as exc:
            # An engine fault fails this request only; the engine stays registered for the next.
            log.exception("engine %s failed during synthesis", plan.engine_name)
            raise Unavailable(f"engine {plan.engine_name!r} failed during synthesis: {type(exc).__name__}",
                              retry_after=1) from None
        finally:
            encoder.abort()
            if pieces is not None:
                pieces.close()

    def synthesize_bytes(self, plan: Plan, cancel: threading.Event, turn: Turn | None = None) -> bytes:
        return b"".join(self.run(plan, cancel, turn=turn))
