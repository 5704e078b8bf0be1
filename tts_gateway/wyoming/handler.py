"""One Wyoming connection: ``describe``, ``synthesize`` and the streaming form, on the shared dispatcher.

Events are read in the library's loop (`AsyncEventHandler.run`); requests run one after another in a
task of their own, so the reader keeps reading while audio is made: it sees text chunks arrive
during a stream and the end of the connection at once. A connection that ends cancels its requests
and with them the synthesis (the worker thread stops at its next chunk and frees its slot).

Every request gets its audio (``audio-start``, ``audio-chunk``s), or an ``error`` event saying why
there is none (or no more), and then the event its client waits for: ``audio-stop`` for
``synthesize`` (even with no audio: Home Assistant reads until it), ``synthesize-stopped`` for a
stream once the client has sent ``synthesize-stop``. The connection stays open after an error.

The handler knows its server only as a `Host` (what a connection needs of the server that accepted
it), so the server imports the handler and never the other way round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import Plan, SynthesisRequest
from tts_gateway.core.text_limits import TextBudget
from tts_gateway.errors import Invalid, TTSGatewayError, Unavailable
from tts_gateway.wyoming.audio_out import AudioOut
from tts_gateway.wyoming.info import build_info
from tts_gateway.wyoming.metrics import WyomingMetrics
from tts_gateway.wyoming.requests import (
    Answer,
    OneShot,
    Refused,
    Request,
    Voice,
    VoiceChoice,
    check_text_format,
    resolve_voice,
    text_field,
)
from tts_gateway.wyoming.text_stream import TextStream

log = logging.getLogger(__name__)


class Host(Protocol):
    """What a connection needs of the server that accepted it (`WyomingServer`)."""

    dispatcher: Dispatcher
    metrics: WyomingMetrics

    @property
    def closing(self) -> bool:
        """Whether new requests are refused (the server is shutting down)."""

    def request_done(self) -> None:
        """A request of this connection has ended (the server may be waiting to drain)."""

    def forget(self, handler: GatewayHandler) -> None:
        """The connection is over and its requests are done."""


class ClientGone(Exception):
    """The connection broke while writing."""


async def _ready(event: Event) -> Event:
    return event


# -- the handler -----------------------------------------------------------------------------------
class GatewayHandler(AsyncEventHandler):
    """Serves one connection on the gateway's shared `Dispatcher` (engines, registry, admission, cache)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Host) -> None:
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
            request = OneShot(text=text_field(data), choice=VoiceChoice.parse(data),
                              text_format=check_text_format(data, ssml=True))
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
        stream = TextStream(budget=TextBudget(self.core.settings.max_text_chars))
        self._stream = stream
        try:
            check_text_format(data)
            self._refuse_if_closing()
            stream.voice = await asyncio.to_thread(resolve_voice, self.core, VoiceChoice.parse(data))
            stream.engine = stream.voice.resolved.engine
        except TTSGatewayError as exc:
            stream.fail(exc)  # reported in order, by the request; its text is dropped until synthesize-stop
        self._submit(stream)

    def _refuse_if_closing(self) -> None:
        if self.server.closing:
            raise Unavailable("the server is shutting down; retry shortly", code="shutting-down", retry_after=5)

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
            voice = resolve_voice(self.core, request.choice)
            request.engine = voice.resolved.engine
            return self.core.service.plan(self._synthesis(request.text, voice, request.text_format), voice.resolved)

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
            raise stream.nothing_spoken()

    @staticmethod
    def _synthesis(text: str, voice: Voice, text_format: str = "text") -> SynthesisRequest:
        # Raw 16-bit mono PCM at the engine's own rate, sent as it is made, sentence by sentence.
        return SynthesisRequest(text=text, voice=voice.resolved.name, language=voice.language, format="pcm",
                                sample_rate=None, stream=True, text_format=text_format)

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
