"""One Wyoming connection: ``describe``, ``synthesize`` and the streaming form, on the shared dispatcher.

Events are read in the library's loop (`AsyncEventHandler.run`); requests run one after another in a
task of their own, so the reader keeps reading while audio is made: it sees text chunks arrive
during a stream and the end of the connection at once. A connection that ends cancels its requests
and with them the synthesis (the worker thread stops at its next chunk and frees its slot).

Every request gets its audio (``audio-start``, ``audio-chunk``s), or an ``error`` event saying why
there is none (or no more), and then the event its client waits for: ``audio-stop`` for
``synthesize`` (even with no audio: Home Assistant reads until it), ``synthesize-stopped`` for a
stream once the client has sent ``synthesize-stop``. The connection stays open after an error.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from tts_gateway.audio import silence
from tts_gateway.core.service import SENTENCE_PAUSE_S, Plan, SynthesisRequest
from tts_gateway.engines.base import match_language
from tts_gateway.errors import Invalid, InvalidField, TTSGatewayError, Unavailable
from tts_gateway.text import (
    has_control_chars,
    has_speakable,
    longest_combining_run,
    split_sentences,
    spoken_length,
)
from tts_gateway.voices.catalog import ResolvedVoice
from tts_gateway.wyoming.info import build_info, usable_voices, voice_languages

if TYPE_CHECKING:
    from tts_gateway.wyoming.server import WyomingServer

log = logging.getLogger(__name__)

WIDTH, CHANNELS = 2, 1  # 16-bit mono PCM
CHUNK_SAMPLES = 1024  # per audio-chunk, as wyoming-piper sends
# Marks a sentence can end with (Latin, CJK, Arabic, Devanagari …): without one, a stream's text cannot
# hold a complete sentence yet.
SENTENCE_END = re.compile(r"[.!?。！？｡…؟।۔\n]")
INLINE_SPLIT_CHARS = 2000


# -- requests ----------------------------------------------------------------------------------------
@dataclass
class VoiceChoice:
    """The ``voice`` object of a request: ``name``, ``language``, ``speaker``, each optional."""

    name: str | None = None
    language: str | None = None
    speaker: str | None = None

    @staticmethod
    def parse(data: dict[str, Any]) -> VoiceChoice:
        raw = data.get("voice")
        if raw is None:
            return VoiceChoice()
        if not isinstance(raw, dict):
            raise InvalidField("voice", "must be an object with name, language and/or speaker")
        values: dict[str, str | None] = {}
        for key in ("name", "language", "speaker"):
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidField(f"voice.{key}", "must be a string")
            values[key] = (value.strip() or None) if isinstance(value, str) else None
        return VoiceChoice(**values)


@dataclass
class Voice:
    """A voice resolved once per request: what the engine needs and the language asked for."""

    resolved: ResolvedVoice
    language: str | None  # the engine's code for the requested language; None: the voice's own
    max_chars: int
    segment_language: str  # the language sentences are split by


def text_field(data: dict[str, Any]) -> str:
    text = data.get("text")
    if not isinstance(text, str):
        raise InvalidField("text", "must be a string")
    return text


def check_text_format(data: dict[str, Any]) -> None:
    fmt = data.get("text_format")
    if fmt not in (None, "text"):
        raise InvalidField("text_format", f"only plain text is supported, not {str(fmt)[:20]!r}")


@dataclass
class Request:
    """One thing to answer, in the order the client asked; a synthesis is counted by engine and outcome
    (``engine`` is known once the voice is)."""

    engine: str = "none"
    counted: bool = True


@dataclass
class Answer(Request):
    """A reply that needs no synthesis: ``info`` (built when its turn comes) or ``pong``."""

    make: Callable[[], Awaitable[Event]] | None = None
    counted: bool = False


@dataclass
class Refused(Request):
    """A request (or a stray event) that was wrong on arrival; its error goes out in turn."""

    error: TTSGatewayError = field(default_factory=lambda: TTSGatewayError("refused"))
    one_shot: bool = False  # a refused ``synthesize``: ends with audio-stop like any other


@dataclass
class OneShot(Request):
    text: str = ""
    choice: VoiceChoice = field(default_factory=VoiceChoice)


@dataclass
class TextStream(Request):
    """The text of a ``synthesize-start`` … ``synthesize-stop`` stream, cut into sentences as they complete.

    A sentence is complete once text after it has arrived (the segmenter then ends it); whatever is
    left when the client stops is the last one. Text past the limit or with control characters fails
    the stream: the rest of its text is dropped until ``synthesize-stop``.
    """

    voice: Voice | None = None
    limit: int = 5000
    error: TTSGatewayError | None = None
    closed: bool = False
    tail: str = ""
    ready: list[str] = field(default_factory=list)
    spoken: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def fail(self, error: TTSGatewayError) -> None:
        if self.error is None:
            self.error = error
        self.changed.set()

    def count(self, text: str) -> None:
        """Bound the stream's text like one request's (TTS_GATEWAY_MAX_TEXT_CHARS), chunk by chunk."""
        if len(text) > self.limit * 8:
            raise InvalidField("text", f"a chunk of {len(text)} code points is over the limit of {self.limit} "
                                       "characters (TTS_GATEWAY_MAX_TEXT_CHARS)")
        if longest_combining_run(text):
            raise InvalidField("text", "stacks too many combining marks on one character")
        if has_control_chars(text):
            raise InvalidField("text", "contains control characters")
        self.spoken += spoken_length(text)
        if self.spoken > self.limit:
            raise InvalidField("text", f"the stream is about {self.spoken} characters so far; the limit is "
                                       f"{self.limit} (TTS_GATEWAY_MAX_TEXT_CHARS)")

    async def add(self, text: str) -> None:
        if self.error is not None or self.closed or self.voice is None:
            return
        try:
            self.count(text)
        except TTSGatewayError as exc:
            self.fail(exc)
            return
        buffered = self.tail + text
        voice = self.voice
        if not SENTENCE_END.search(buffered) and len(buffered) <= voice.max_chars:
            self.tail = buffered  # no sentence can have ended: the segmenter is not needed yet
            return
        args = (buffered, voice.segment_language, voice.max_chars)
        # Short text is split right here (about a millisecond); a thread hop would cost more on a busy host.
        pieces = split_sentences(*args) if len(buffered) <= INLINE_SPLIT_CHARS else (
            await asyncio.to_thread(split_sentences, *args))
        if len(pieces) > 1:
            self.ready.extend(p for p in pieces[:-1] if has_speakable(p))
            # the open sentence, with the word break the client may have sent at its end
            self.tail = pieces[-1] + (" " if buffered[-1:].isspace() else "")
            self.changed.set()
            await asyncio.sleep(0)  # let the request start on it before more buffered text is read
        else:
            self.tail = buffered

    def finish(self) -> None:
        """The client sent ``synthesize-stop``: what is left is the last sentence."""
        if self.error is None and not self.closed and has_speakable(self.tail):
            self.ready.append(self.tail.strip())
        self.tail = ""
        self.closed = True
        self.changed.set()
        self.stopped.set()

    async def next_batch(self, first: bool = False) -> list[str] | None:
        """The complete sentences not yet spoken (waiting for one), or None at the end; raises its error.

        The ``first`` batch is the first sentence alone, so its audio comes soonest; later batches take
        every sentence that is ready, spoken in order as one streamed plan while the audio before them
        plays.
        """
        while True:
            if self.error is not None:
                raise self.error
            if self.ready:
                take = 1 if first else len(self.ready)
                batch, self.ready = self.ready[:take], self.ready[take:]
                return batch
            if self.closed:
                return None
            self.changed.clear()
            await self.changed.wait()


# -- audio out -------------------------------------------------------------------------------------
class AudioOut:
    """``audio-start``, ``audio-chunk``s of whole samples with running timestamps, ``audio-stop``."""

    def __init__(self, send: Callable[[Event], Awaitable[None]]) -> None:
        self._send = send
        self.rate: int | None = None
        self._carry = b""
        self._samples = 0

    @property
    def started(self) -> bool:
        return self.rate is not None

    def _ms(self) -> int:
        return self._samples * 1000 // self.rate if self.rate else 0

    async def start(self, rate: int) -> None:
        if self.rate is None:
            self.rate = rate
            await self._send(AudioStart(rate=rate, width=WIDTH, channels=CHANNELS, timestamp=0).event())
        elif rate != self.rate:  # one request speaks with one voice, so one engine and one rate
            raise Unavailable(f"the audio rate changed mid-request ({self.rate} → {rate} Hz)")

    async def write(self, data: bytes) -> None:
        assert self.rate is not None
        data = self._carry + data
        end = len(data) - len(data) % WIDTH
        self._carry = data[end:]
        step = CHUNK_SAMPLES * WIDTH * CHANNELS
        for offset in range(0, end, step):
            piece = data[offset : min(offset + step, end)]
            timestamp = self._ms()
            self._samples += len(piece) // (WIDTH * CHANNELS)
            await self._send(AudioChunk(rate=self.rate, width=WIDTH, channels=CHANNELS, audio=piece,
                                        timestamp=timestamp).event())

    async def pause(self) -> None:
        """The gateway's pause between sentences (as `SynthesisService` puts between pieces)."""
        assert self.rate is not None
        await self.write(bytes(silence(self.rate, SENTENCE_PAUSE_S).size * WIDTH))

    async def stop(self) -> None:
        await self._send(AudioStop(timestamp=self._ms()).event())


class ClientGone(Exception):
    """The connection broke while writing."""


async def _ready(event: Event) -> Event:
    return event


# -- the handler -----------------------------------------------------------------------------------
class GatewayHandler(AsyncEventHandler):
    """Serves one connection on the gateway's shared `Dispatcher` (engines, registry, admission, cache)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: WyomingServer) -> None:
        super().__init__(reader, writer)
        self.server = server
        self.dispatcher = server.dispatcher
        self.core = server.dispatcher.core
        self.metrics = server.metrics
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._pending = 0  # requests queued or running
        self._stream: TextStream | None = None  # the stream whose text is arriving
        self._write_lock = asyncio.Lock()
        self._gone = False
        self.finished = asyncio.Event()  # the connection is over and its requests are done

    @property
    def busy(self) -> bool:
        return self._pending > 0

    # -- reading ---------------------------------------------------------------------------------
    async def handle_event(self, event: Event) -> bool:
        """Returning False ends the connection: only when the client is gone, never for bad input."""
        if self._gone:
            return False
        kind = event.type
        one_shot = Synthesize.is_type(kind)
        synthesis = one_shot or SynthesizeStart.is_type(kind)
        try:
            await self._handle(event)
        except TTSGatewayError as exc:  # answered in turn, after what the client asked before
            self._submit(Refused(error=exc, counted=synthesis, one_shot=one_shot))
        except Exception as exc:
            log.exception("wyoming: handling a %r event failed", kind)
            error = TTSGatewayError(f"internal error ({type(exc).__name__}); see the server log")
            self._submit(Refused(error=error, counted=synthesis, one_shot=one_shot))
        return True

    async def _handle(self, event: Event) -> None:
        kind, data = event.type, event.data if event.data is not None else {}
        if not isinstance(data, dict):
            raise Invalid(f"the data of a {kind[:40]!r} event must be a JSON object", code="invalid-event")
        if Describe.is_type(kind):
            self._submit(Answer(make=self._info))
        elif Ping.is_type(kind):
            pong = Pong(text=Ping.from_event(event).text).event()
            self._submit(Answer(make=lambda: _ready(pong)))
        elif Synthesize.is_type(kind):
            if self._stream is not None:
                return  # streaming clients repeat the whole text for older servers: already spoken
            request = OneShot(text=text_field(data), choice=VoiceChoice.parse(data))
            check_text_format(data)
            self._refuse_if_closing()
            self._submit(request)
        elif SynthesizeStart.is_type(kind):
            await self._start_stream(data)
        elif SynthesizeChunk.is_type(kind):
            if self._stream is None:
                raise Invalid("synthesize-chunk without synthesize-start: open a stream first", code="no-stream")
            try:
                text = text_field(data)
            except TTSGatewayError as exc:
                self._stream.fail(exc)
                return
            await self._stream.add(text)
        elif SynthesizeStop.is_type(kind):
            if self._stream is None:
                raise Invalid("synthesize-stop without synthesize-start: no stream is open", code="no-stream")
            stream, self._stream = self._stream, None
            stream.finish()
        else:
            log.debug("wyoming: ignoring a %r event", kind)

    async def _start_stream(self, data: dict[str, Any]) -> None:
        if self._stream is not None:
            raise Invalid("synthesize-start while a stream is open: end it with synthesize-stop first",
                          code="stream-open")
        stream = TextStream(limit=self.core.settings.max_text_chars)
        self._stream = stream
        try:
            check_text_format(data)
            self._refuse_if_closing()
            stream.voice = await asyncio.to_thread(self._resolve, VoiceChoice.parse(data))
            stream.engine = stream.voice.resolved.engine
        except TTSGatewayError as exc:
            stream.fail(exc)  # reported in order, by the request; its text is dropped until synthesize-stop
        self._submit(stream)

    def _refuse_if_closing(self) -> None:
        if self.server.closing:
            raise Unavailable("the server is shutting down; retry shortly", code="shutting-down", retry_after=5)

    def _resolve(self, choice: VoiceChoice) -> Voice:
        """The voice a request names (or, given only a language, one that speaks it); blocking."""
        core = self.core
        name = choice.name
        if name is None and choice.language is not None:
            name = self._voice_for_language(choice.language)
        resolved = core.voices.resolve(name)
        engine = core.engines.check_available(resolved.engine)
        language = match_language(engine, choice.language) if choice.language else None
        if choice.speaker is not None:
            raise InvalidField("voice.speaker", f"voice {resolved.name!r} has no speaker {choice.speaker[:40]!r} "
                                                "(no voice here has speakers; leave speaker out)",
                               code="unknown-speaker")
        segment_language = language or resolved.language or engine.languages[0]
        return Voice(resolved, language, engine.max_chars(segment_language), segment_language)

    def _voice_for_language(self, language: str) -> str:
        """The default voice when it speaks ``language``, else the first usable voice that does."""
        wanted = language.strip().lower().replace("_", "-")

        def speaks(codes: list[str]) -> bool:
            return any(c == wanted or c.split("-")[0] == wanted.split("-")[0] for c in codes)

        voices = usable_voices(self.core)
        default = self.core.settings.default_voice
        ordered = sorted(voices, key=lambda v: (v["name"] != default, v["kind"] != "builtin"))
        for voice in ordered:
            if speaks([c.lower() for c in voice_languages(self.core, voice)]):
                return str(voice["name"])
        raise InvalidField("voice.language", f"no voice speaks {language[:20]!r}; describe lists the voices",
                           code="unsupported-language")

    # -- running requests --------------------------------------------------------------------------
    def _submit(self, request: Request) -> None:
        self._pending += 1
        self._queue.put_nowait(request)
        if self._worker is None:
            self._worker = asyncio.create_task(self._work(), name="wyoming request")

    async def _work(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                if self._gone:  # the client is gone: nothing of it is started any more
                    if request.counted:
                        self.metrics.requests.labels(request.engine, "cancelled").inc()
                    continue
                await self._serve(request)
            finally:
                self._pending -= 1
                self.server.request_done()

    async def _serve(self, request: Request) -> None:
        """Run one request and report it once: audio, or an error; counted by engine and outcome."""
        audio = AudioOut(self._send)
        outcome = "ok"
        try:
            try:
                if isinstance(request, TextStream):
                    await self._speak_stream(request, audio)
                elif isinstance(request, OneShot):
                    await self._speak_once(request, audio)
                elif isinstance(request, Answer) and request.make is not None:
                    await self._send(await request.make())
                elif isinstance(request, Refused):
                    raise request.error
            except TTSGatewayError as exc:
                outcome = exc.kind
                log.info("wyoming: refused (%s): %s", exc.code, exc.detail)
                await self._send_error(exc)
            except (ClientGone, asyncio.CancelledError):
                outcome = "cancelled"
                raise
            except Exception as exc:
                outcome = "internal"
                log.exception("wyoming: request failed")
                await self._send_error(TTSGatewayError(f"internal error ({type(exc).__name__}); see the server log"))
            # A request always ends with the event its client waits for, audio or not: audio-stop for
            # synthesize (Home Assistant reads until it), synthesize-stopped for a stream.
            if audio.started or isinstance(request, OneShot) or (isinstance(request, Refused) and request.one_shot):
                await audio.stop()
            if isinstance(request, TextStream):
                await request.stopped.wait()  # the client's synthesize-stop; its audio is all out
                await self._send(SynthesizeStopped().event())
        except ClientGone:
            outcome = "cancelled"
        finally:
            if request.counted:
                self.metrics.requests.labels(request.engine, outcome).inc()

    async def _info(self) -> Event:
        info = await asyncio.to_thread(build_info, self.core)  # the catalog as it is now
        return info.event()

    async def _speak_once(self, request: OneShot, audio: AudioOut) -> None:
        def prepare() -> Plan:
            voice = self._resolve(request.choice)
            request.engine = voice.resolved.engine
            return self.core.service.plan(self._synthesis(request.text, voice), voice.resolved)

        name = request.choice.name
        if name is not None and ":" in name:  # a built-in voice resolves without the registry: no thread hop
            plan = prepare()
        else:  # a preset or a language: resolving reads the registry, in a thread
            self.core.service.check_text(request.text)  # cheap, before anything is resolved
            plan = await asyncio.to_thread(prepare)
        # A streamed plan: its sentences run one after the other, the first one heard as soon as it is made.
        await self._play(plan, audio)

    async def _speak_stream(self, stream: TextStream, audio: AudioOut) -> None:
        spoken = False
        while (batch := await stream.next_batch(first=not spoken)) is not None:
            assert stream.voice is not None
            # The voice is resolved already, so planning a few sentences is cheap: done here, no thread hop.
            plan = self.core.service.plan(self._synthesis(" ".join(batch), stream.voice), stream.voice.resolved)
            await self._play(plan, audio, pause=spoken, abandon=lambda: stream.error is not None)
            spoken = True
        if not spoken:
            raise InvalidField("text", "must not be empty: the stream held nothing to speak")

    @staticmethod
    def _synthesis(text: str, voice: Voice) -> SynthesisRequest:
        # Raw 16-bit mono PCM at the engine's own rate, sent as it is made, sentence by sentence.
        return SynthesisRequest(text=text, voice=voice.resolved.name, language=voice.language, format="pcm",
                                sample_rate=None, stream=True)

    async def _play(self, plan: Plan, audio: AudioOut, *, pause: bool = False,
                    abandon: Callable[[], bool] = lambda: False) -> None:
        """Run ``plan`` on the dispatcher (phrase cache, admission, worker) and send its audio as it comes.

        The rest of the stream is read by a task of its own from the start, so whatever ends this
        request (disconnect, error, ``abandon``) cancels that task inside the stream, which tells the
        worker thread to stop and frees the admission slot.
        """
        outcome = await self.dispatcher.run(plan)
        if outcome.audio is not None:  # a phrase-cache hit: the whole PCM at once
            await audio.start(plan.rate)
            if pause:
                await audio.pause()
            await audio.write(outcome.audio)
            return
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        rest = outcome.rest

        async def pump() -> None:
            try:
                if rest is not None:
                    async for chunk in rest:
                        chunks.put_nowait(chunk)
            finally:
                chunks.put_nowait(None)

        reader = asyncio.create_task(pump(), name="wyoming audio")
        await asyncio.sleep(0)  # let it enter the stream, so cancelling it reaches the worker
        try:
            await audio.start(plan.rate)
            if pause:
                await audio.pause()
            await audio.write(outcome.first)
            while (chunk := await chunks.get()) is not None:
                if abandon():
                    return
                await audio.write(chunk)
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            failure = None if reader.cancelled() else reader.exception()  # retrieved in every case
        if failure is not None:
            raise Unavailable(f"engine {plan.engine_name!r} failed during synthesis: {type(failure).__name__}",
                              retry_after=1) from failure

    # -- writing ---------------------------------------------------------------------------------
    async def _send(self, event: Event) -> None:
        if self._gone:
            raise ClientGone
        try:
            async with self._write_lock:
                await self.write_event(event)
        except ConnectionError as exc:
            self._gone = True
            raise ClientGone from exc

    async def _send_error(self, exc: TTSGatewayError) -> None:
        await self._send(Error(text=exc.detail, code=exc.code).event())

    # -- ending ------------------------------------------------------------------------------------
    async def disconnect(self) -> None:
        """The client went away (or the server is stopping): cancel what is queued and running."""
        self._gone = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.wait([worker])
        while not self._queue.empty():  # queued, never started: counted as cancelled too
            request = self._queue.get_nowait()
            self._pending -= 1
            if request.counted:
                self.metrics.requests.labels(request.engine, "cancelled").inc()
        self.finished.set()
        self.server.forget(self)
