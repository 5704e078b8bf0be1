"""Home Assistant speaks through the gateway: the Wyoming protocol beside the HTTP API.

Every test talks to a real ``tts-gateway serve`` subprocess with the wyoming library's own client
(`AsyncTcpClient`). Nothing depends on how fast the machine is: where an order matters (audio before
the last text chunk, a synthesis still running when the client leaves or the server is told to stop)
the test waits for the first event before doing the next thing, or holds the synthesis at a gate word
of the fake cloning engine (tests/fake_cloning_plugin.py) that only the test opens. Timeouts are hang
guards only.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import signal
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from tests.conftest import (
    HANG_GUARD_S,
    ROOT,
    GatewayProcess,
    decode,
    free_port,
    metric,
    register,
    uvicorn_server,
    voice_audio,
    wait_until,
    wav,
)

CLONE_RATE = 16000  # the fake cloning engine: one 0.2 s tone per word
WORD = CLONE_RATE // 5
PAUSE = int(CLONE_RATE * 0.2)  # the gateway's pause between sentences


# -- helpers -----------------------------------------------------------------------------------------
@dataclass
class Gateway:
    base: str
    wyoming_port: int
    gates: Path

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.wyoming_port, connect_timeout=HANG_GUARD_S, read_timeout=HANG_GUARD_S)


@dataclass
class Heard:
    """What came back for one request."""

    events: list[Event] = field(default_factory=list)
    start: AudioStart | None = None
    chunks: list[AudioChunk] = field(default_factory=list)
    error: Error | None = None

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def pcm(self) -> bytes:
        return b"".join(c.audio for c in self.chunks)

    def take(self, event: Event) -> None:
        self.events.append(event)
        if AudioStart.is_type(event.type):
            self.start = AudioStart.from_event(event)
        elif AudioChunk.is_type(event.type):
            self.chunks.append(AudioChunk.from_event(event))
        elif Error.is_type(event.type):
            self.error = Error.from_event(event)


async def read_until(client: AsyncTcpClient, heard: Heard, *done: str) -> Heard:
    """Read events into ``heard`` until one of type ``done`` arrives."""
    while True:
        event = await client.read_event()
        assert event is not None, f"the server closed the connection; so far: {heard.types}"
        heard.take(event)
        if event.type in done:
            return heard


async def synthesize(gateway: Gateway, text: str, voice: SynthesizeVoice | None = None) -> Heard:
    async with gateway.client() as client:
        await client.write_event(Synthesize(text=text, voice=voice).event())
        return await read_until(client, Heard(), AudioStop().event().type)


async def describe(gateway: Gateway) -> Info:
    async with gateway.client() as client:
        await client.write_event(Describe().event())
        event = await client.read_event()
        assert event is not None and Info.is_type(event.type), event
        return Info.from_event(event)


def chunks_of(text: str, words: int = 5) -> list[str]:
    split = text.split()
    return [" ".join(split[i : i + words]) + " " for i in range(0, len(split), words)]


def assert_pcm_stream(heard: Heard, rate: int) -> None:
    """audio-start, audio-chunks of 16-bit mono at ``rate`` with running timestamps, audio-stop."""
    assert heard.error is None, heard.error
    assert heard.types[0] == "audio-start" and heard.types[-1] == "audio-stop", heard.types
    assert heard.types.count("audio-start") == 1 and heard.types.count("audio-stop") == 1
    assert heard.start is not None and (heard.start.rate, heard.start.width, heard.start.channels) == (rate, 2, 1)
    assert len(heard.chunks) >= 2
    samples = 0
    for chunk in heard.chunks:
        assert (chunk.rate, chunk.width, chunk.channels) == (rate, 2, 1)
        assert len(chunk.audio) % 2 == 0
        assert chunk.timestamp == samples * 1000 // rate
        samples += len(chunk.audio) // 2


def decode_pcm(pcm: bytes, rate: int) -> tuple[np.ndarray, int]:
    """Wrap the PCM in a WAV header and decode it, as Home Assistant does with what it receives."""
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(pcm)
    return decode(out.getvalue())


def word_runs(pcm: bytes) -> list[int]:
    """The fake engine's audio cut at the gateway's pauses: words per sentence, in order."""
    samples = np.frombuffer(pcm, "<i2")
    silent = samples == 0
    runs: list[int] = []
    start = 0
    index = 0
    while index < samples.size:
        if silent[index:index + PAUSE].all() and index + PAUSE <= samples.size:
            if index > start:
                runs.append(index - start)
            index += PAUSE
            start = index
        else:
            index += 1
    if start < samples.size:
        runs.append(samples.size - start)
    return [round(n / WORD) for n in runs]


def add_voice(base: str, name: str, audio: bytes, engine: str = "xtts") -> None:
    """Register a preset over HTTP (English, described), asserting the 201."""
    response = register(base, name, audio, engine=engine, language="en", description=f"the {name} voice")
    assert response.status_code == 201, response.text


# -- the server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path, speech_wav: bytes) -> Iterator[Gateway]:
    """Piper, tiny XTTS, espeak-ng and the fake cloning engine; one synthesis at a time and no queue, so a
    second one at once is refused (busy) whichever edge it comes from."""
    gates = tmp_path_factory.mktemp("wyoming-gates")
    port = free_port()
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path_factory.mktemp("wyoming-data")),
           "TTS_GATEWAY_ENGINES": "piper,xtts,espeak", "TTS_GATEWAY_XTTS_CHECKPOINT": str(tiny_xtts),
           "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{port}", "TTS_GATEWAY_ENGINE_THREADS": "1",
           "TTS_GATEWAY_MAX_CONCURRENCY": "1", "TTS_GATEWAY_MAX_QUEUE": "0",
           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin", "PYTHONPATH": str(ROOT), "FAKE_GATE_DIR": str(gates)}
    with uvicorn_server(env) as base:
        add_voice(base, "wy-preset", speech_wav)
        add_voice(base, "wy-clone", wav(voice_audio()), engine="clone")
        yield Gateway(base, port, gates)


def test_describe_lists_builtins_and_presets_as_they_come_and_go(gateway: Gateway, speech_wav: bytes) -> None:
    info = asyncio.run(describe(gateway))
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.name == "tts-gateway" and program.installed and program.supports_synthesize_streaming
    voices = {v.name: v for v in program.voices}
    joe = voices["piper:joe"]
    assert joe.installed and joe.languages == ["en"] and "joe" in (joe.description or "").lower()
    assert "CC0" in joe.attribution.name
    preset = voices["wy-preset"]
    assert preset.installed and preset.languages[0] == "en" and "de" in preset.languages  # XTTS speaks 16
    assert preset.description == "wy-preset: the wy-preset voice"
    assert "xtts" in preset.attribution.name and preset.version  # the voice's sha256, shortened
    assert "wy-later" not in voices

    add_voice(gateway.base, "wy-later", speech_wav)  # over HTTP, while the Wyoming server runs
    assert "wy-later" in {v.name for v in asyncio.run(describe(gateway)).tts[0].voices}
    assert httpx.delete(gateway.base + "/v1/voices/wy-later", timeout=HANG_GUARD_S).status_code == 204
    assert "wy-later" not in {v.name for v in asyncio.run(describe(gateway)).tts[0].voices}


def test_synthesize_by_preset_gives_pcm_at_the_engine_rate(gateway: Gateway) -> None:
    text = "Hello from Home Assistant. The gateway speaks with a cloned voice."
    heard = asyncio.run(synthesize(gateway, text, SynthesizeVoice(name="wy-preset")))
    rate = httpx.get(gateway.base + "/v1/engines/xtts", timeout=HANG_GUARD_S).json()["sample_rate"]
    assert rate == 24000
    assert_pcm_stream(heard, rate)
    audio, decoded_rate = decode_pcm(heard.pcm, heard.start.rate if heard.start else 0)
    assert decoded_rate == rate
    # The same request over HTTP (raw PCM): the tiny model makes a fixed number of audio tokens per
    # sentence, so the two are the same length whatever the seed.
    http = httpx.post(gateway.base + "/v1/synthesize", json={"text": text, "voice": "wy-preset", "format": "pcm"},
                      timeout=HANG_GUARD_S)
    assert http.status_code == 200, http.text
    assert audio.size == len(http.content) // 2
    assert audio.size / rate > 2 * 1.0  # two sentences of audio
    assert np.abs(audio).max() > 0.01


@pytest.mark.parametrize(
    ("voice", "rate"),
    [(SynthesizeVoice(name="piper:joe"), 22050), (None, 22050), (SynthesizeVoice(language="en-US"), 22050),
     (SynthesizeVoice(name="wy-clone"), CLONE_RATE)],
    ids=["piper:joe", "default", "language-only", "clone-preset"],
)
def test_synthesize_speaks_sentence_by_sentence(gateway: Gateway, voice: SynthesizeVoice | None, rate: int) -> None:
    heard = asyncio.run(synthesize(gateway, "One two three. Four five. Six.", voice))
    assert_pcm_stream(heard, rate)
    audio, _ = decode_pcm(heard.pcm, rate)
    assert audio.size / rate > 1.0 and np.abs(audio).max() > 0.01
    if voice is not None and voice.name == "wy-clone":  # deterministic: three sentences, in order
        assert word_runs(heard.pcm) == [3, 2, 1]


# Sentences of different lengths, so the fake engine's audio shows which came when.
PARAGRAPH = ("Lamps glow softly. The old clock in the hall chimed. Nobody moved. Rain tapped against the window. "
             "Then the door opened. A tall stranger stepped inside quietly.")
WORDS_PER_SENTENCE = [3, 7, 2, 5, 4, 6]


async def stream(gateway: Gateway, voice: str, text: str) -> tuple[Heard, int, int]:
    """Send ``text`` in 5-word chunks the way Home Assistant does; after the chunk that completes the first
    sentence, wait for the first audio chunk before sending the rest. Returns what came back, how many text
    chunks had been sent when the first audio arrived, and how many there are."""
    parts = chunks_of(text)
    first_sentence_words = len(re.split(r"(?<=[.!?])\s+", text)[0].split())
    sent_before_audio = -(-(first_sentence_words + 1) // 5)  # the sentence ends once a word follows it
    heard = Heard()
    async with gateway.client() as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=voice)).event())
        for part in parts[:sent_before_audio]:
            await client.write_event(SynthesizeChunk(text=part).event())
        while not heard.chunks:  # sentence one is spoken while the client still holds the rest of the text
            await read_until(client, heard, "audio-chunk", "error")
            assert heard.error is None, heard.error
        for part in parts[sent_before_audio:]:
            await client.write_event(SynthesizeChunk(text=part).event())
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())  # as HA does
        await client.write_event(SynthesizeStop().event())
        await read_until(client, heard, SynthesizeStopped().event().type)
    return heard, sent_before_audio, len(parts)


def test_stream_in_five_word_chunks_speaks_each_sentence_as_it_completes(gateway: Gateway) -> None:
    heard, sent, total = asyncio.run(stream(gateway, "wy-clone", PARAGRAPH))
    assert sent < total  # the first audio came before the last text chunk was sent
    assert heard.types[-2:] == ["audio-stop", "synthesize-stopped"]
    assert_pcm_stream(Heard(heard.events[:-1], heard.start, heard.chunks), CLONE_RATE)
    assert word_runs(heard.pcm) == WORDS_PER_SENTENCE  # every sentence once, in order, the repeat ignored
    one_shot = asyncio.run(synthesize(gateway, PARAGRAPH, SynthesizeVoice(name="wy-clone")))
    assert heard.pcm == one_shot.pcm  # the same audio as the whole text at once


def test_stream_with_a_real_voice(gateway: Gateway) -> None:
    heard, sent, total = asyncio.run(stream(gateway, "piper:joe", PARAGRAPH))
    assert sent < total
    assert heard.types[-2:] == ["audio-stop", "synthesize-stopped"]
    assert_pcm_stream(Heard(heard.events[:-1], heard.start, heard.chunks), 22050)
    audio, _ = decode_pcm(heard.pcm, 22050)
    assert audio.size / 22050 > len(WORDS_PER_SENTENCE) * 0.5 and np.abs(audio).max() > 0.05


async def bad_requests(gateway: Gateway) -> list[tuple[str, Heard]]:
    """Each bad request on one connection: every one gets an error event, and the connection stays usable."""
    results = []
    one_shots = {
        "unknown voice": Synthesize(text="Hello.", voice=SynthesizeVoice(name="no-such-voice")),
        "unknown built-in": Synthesize(text="Hello.", voice=SynthesizeVoice(name="piper:nobody")),
        "misspelt engine": Synthesize(text="Hello.", voice=SynthesizeVoice(name="espek:de")),
        "empty text": Synthesize(text="   "),
        "text over the limit": Synthesize(text="word " * 2000),
        "speaker": Synthesize(text="Hello.", voice=SynthesizeVoice(name="piper:joe", speaker="alice")),
        "language nobody speaks": Synthesize(text="Hello.", voice=SynthesizeVoice(language="zz")),
    }
    async with gateway.client() as client:
        for label, request in one_shots.items():
            await client.write_event(request.event())
            results.append((label, await read_until(client, Heard(), "audio-stop")))
        await client.write_event(SynthesizeChunk(text="no stream open").event())
        results.append(("chunk without start", await read_until(client, Heard(), "error")))
        # the streaming form: the error comes first, then synthesize-stopped once the client stops
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="no-such-voice")).event())
        await client.write_event(SynthesizeChunk(text="Hello there. ").event())
        await client.write_event(SynthesizeStop().event())
        results.append(("unknown voice, streaming", await read_until(client, Heard(), "synthesize-stopped")))
        # a stream is bounded like one request: its chunks count together
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="piper:joe")).event())
        for _ in range(2):
            await client.write_event(SynthesizeChunk(text="word " * 600).event())  # 3000 characters each
        await client.write_event(SynthesizeStop().event())
        results.append(("stream over the limit", await read_until(client, Heard(), "synthesize-stopped")))
        await client.write_event(Describe().event())  # still connected, still answered
        event = await client.read_event()
        assert event is not None and Info.is_type(event.type)
    return results


def test_bad_input_gets_an_error_event_not_a_dropped_connection(gateway: Gateway) -> None:
    expected = {
        "unknown voice": ("unknown-voice", "no-such-voice"), "unknown built-in": ("unknown-voice", "piper:nobody"),
        "misspelt engine": ("unknown-voice", "did you mean espeak:de?"),
        "empty text": ("invalid-field", "must not be empty"), "text over the limit": ("invalid-field", "limit"),
        "speaker": ("unknown-speaker", "speaker"), "language nobody speaks": ("unsupported-language", "zz"),
        "chunk without start": ("no-stream", "synthesize-start"),
        "unknown voice, streaming": ("unknown-voice", "no-such-voice"),
        "stream over the limit": ("invalid-field", "limit"),
    }
    before = metric(gateway.base, "tts_wyoming_requests_total", outcome="not_found")
    results = asyncio.run(bad_requests(gateway))
    assert [label for label, _ in results] == list(expected)
    for label, heard in results:
        code, words = expected[label]
        assert heard.error is not None, (label, heard.types)
        assert heard.error.code == code and words in heard.error.text, (label, heard.error)
        assert "Traceback" not in heard.error.text
        # a stream's text may pass the limit only after its first pieces were spoken (long unpunctuated text
        # is cut at the engine's limit): what came before the limit is heard, then the error
        assert not heard.chunks or label == "stream over the limit", label
    # every request still ends with the event its client waits for, so none is left hanging
    terminal = {"chunk without start": [], "unknown voice, streaming": ["synthesize-stopped"],
                "stream over the limit": ["synthesize-stopped"]}
    for label, heard in results:
        ending = ["error", *terminal.get(label, ["audio-stop"])]
        if heard.chunks:
            ending = ["error", "audio-stop", "synthesize-stopped"]
        assert heard.types[-len(ending):] == ending and heard.types.count("error") == 1, (label, heard.types)
    assert metric(gateway.base, "tts_wyoming_requests_total", outcome="not_found") == before + 4


def test_bad_text_gets_the_words_http_gives_it(gateway: Gateway) -> None:
    """The same bad text as one HTTP request, as a ``synthesize`` and as a stream's chunks: one error, word
    for word (the core's text checks, with a stream's chunks counted together)."""
    cases = {
        "over the limit": ["Hello ", "word " * 1200],
        "stacked marks": ["Hello a" + "\u0301" * 20 + "."],
        "control characters": ["Hello\x01 there."],
        "blank": ["   ", " "],
        "nothing to speak": ["\u200b", "\u200b"],
    }
    voice = SynthesizeVoice(name="piper:joe")

    async def errors(chunks: list[str]) -> tuple[Heard, Heard]:
        async with gateway.client() as client:
            await client.write_event(Synthesize(text="".join(chunks), voice=voice).event())
            one_shot = await read_until(client, Heard(), "audio-stop")
            await client.write_event(SynthesizeStart(voice=voice).event())
            for chunk in chunks:
                await client.write_event(SynthesizeChunk(text=chunk).event())
            await client.write_event(SynthesizeStop().event())
            return one_shot, await read_until(client, Heard(), "synthesize-stopped")

    for label, chunks in cases.items():
        http = httpx.post(gateway.base + "/v1/synthesize", json={"text": "".join(chunks), "voice": "piper:joe"},
                          timeout=HANG_GUARD_S)
        assert http.status_code == 422, (label, http.text)
        for heard in asyncio.run(errors(chunks)):
            assert heard.error is not None and heard.error.code == "invalid-field", (label, heard.types)
            assert heard.error.text == http.json()["detail"], label
            assert not heard.chunks, label


async def hold(gateway: Gateway, token: str, text: str) -> tuple[AsyncTcpClient, Heard]:
    """A synthesis by the fake cloning preset held at ``wait-for-<token>`` (its first word) until the gate opens."""
    client = gateway.client()
    await client.connect()
    await client.write_event(Synthesize(text=f"wait-for-{token} {text}", voice=SynthesizeVoice(name="wy-clone"))
                             .event())
    return client, Heard()


def test_busy_server_answers_with_an_error_event_on_both_edges(gateway: Gateway) -> None:
    """One slot, no queue: while a Wyoming synthesis holds the slot, a second one (Wyoming or HTTP) is refused."""

    async def scenario() -> tuple[Heard, Heard, httpx.Response]:
        client, held = await hold(gateway, "busy", "one two.")
        try:
            await asyncio.to_thread(wait_until, lambda: metric(gateway.base, "tts_in_flight") == 1,
                                    "the held synthesis to take the slot")
            refused = await synthesize(gateway, "Hello.", SynthesizeVoice(name="piper:joe"))
            http = await asyncio.to_thread(httpx.post, gateway.base + "/v1/synthesize", json={"text": "Hello."},
                                           timeout=HANG_GUARD_S)
            (gateway.gates / "busy").touch()
            await read_until(client, held, "audio-stop")
        finally:
            await client.disconnect()
        return held, refused, http

    held, refused, http = asyncio.run(scenario())
    assert refused.error is not None and refused.error.code == "unavailable", refused.types
    assert "busy" in refused.error.text and refused.types == ["error", "audio-stop"]
    assert http.status_code == 503  # the same admission control for HTTP
    assert_pcm_stream(held, CLONE_RATE)  # the held one finished normally
    assert word_runs(held.pcm) == [3]


@pytest.mark.parametrize("form", ["stream", "synthesize"])
def test_disconnect_mid_request_cancels_the_work(gateway: Gateway, form: str) -> None:
    """The client leaves after the first sentence's audio; the second sentence waits at a gate that never opens.

    The request cannot end by itself (the gate stays shut; a stream also never gets synthesize-stop), so only
    the cancellation the disconnect sets off can count it as cancelled and free its slot. (The fake engine
    hands a sentence over whole, so the gate sits in sentence two for sentence one to be heard.)
    """
    before = metric(gateway.base, "tts_wyoming_requests_total", engine="clone", outcome="cancelled")
    text = "One two. wait-for-never three four. Five six."

    async def leave_early() -> Heard:
        heard = Heard()
        async with gateway.client() as client:
            if form == "stream":
                await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="wy-clone")).event())
                await client.write_event(SynthesizeChunk(text=text).event())
            else:
                await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="wy-clone")).event())
            await read_until(client, heard, "audio-chunk", "error")
            if form == "synthesize":  # one synthesis for the whole text: now held at the gate
                await asyncio.to_thread(wait_until, lambda: metric(gateway.base, "tts_in_flight") == 1,
                                        "the synthesis to be held at the gate")
        return heard  # leaving the block closes the connection mid-request

    heard = asyncio.run(leave_early())
    assert heard.chunks and heard.error is None
    wait_until(lambda: metric(gateway.base, "tts_wyoming_requests_total", engine="clone", outcome="cancelled")
               == before + 1, "the abandoned request to be cancelled")
    wait_until(lambda: metric(gateway.base, "tts_in_flight") == 0, "the abandoned synthesis to stop")
    assert metric(gateway.base, "tts_queue_depth") == 0
    wait_until(lambda: metric(gateway.base, "tts_wyoming_connections") == 0, "the connection to be forgotten")


def test_sigterm_drains_wyoming_requests(tmp_path: Path) -> None:
    """SIGTERM while a Wyoming synthesis is held at a gate: the server stops accepting HTTP, finishes the Wyoming
    request once the gate opens, then exits."""
    gates = tmp_path / "gates"
    gates.mkdir()
    wyoming_port = free_port()
    server = GatewayProcess({"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper",
                             "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin", "TTS_GATEWAY_CANARY": "0",
                             "TTS_GATEWAY_TIMEOUT_S": "60",
                             "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{wyoming_port}",
                             "FAKE_GATE_DIR": str(gates)})
    process, base = server.process, server.base
    gateway = Gateway(base, wyoming_port, gates)

    async def scenario() -> Heard:
        client, held = await hold(gateway, "drain", "one two three.")
        try:
            await asyncio.to_thread(wait_until, lambda: metric(base, "tts_in_flight") == 1, "the synthesis to start")
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, server.refuses_connections,
                                    "the server to stop accepting after SIGTERM")
            assert process.poll() is None and not held.events  # draining: still held at the gate
            (gates / "drain").touch()
            return await read_until(client, held, "audio-stop")
        finally:
            await client.disconnect()

    try:
        server.wait_up()
        add_voice(base, "wy-clone", wav(voice_audio()), engine="clone")
        held = asyncio.run(scenario())
        assert_pcm_stream(held, CLONE_RATE)
        assert word_runs(held.pcm) == [4]
        assert process.wait(HANG_GUARD_S) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        server.stop()


# -- in-process: the warning about a non-loopback address ------------------------------------------------
@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_non_loopback_address_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str,
                                              warned: bool) -> None:
    from tests.fake_engine import FakeEngine, FakePlugin
    from tts_gateway.config import Settings
    from tts_gateway.core.compose import build_core
    from tts_gateway.core.dispatch import Dispatcher
    from tts_gateway.wyoming import WyomingServer, build_info, is_loopback

    settings = Settings(data_dir=tmp_path / "data", engines=(), default_voice="fake:one", canary=False)
    core = build_core(settings, extra_plugins=[FakePlugin(FakeEngine())], load_entry_points=False,
                      phrase_cache=False)

    async def run() -> None:
        dispatcher = Dispatcher(core)
        try:
            server = WyomingServer(dispatcher, f"tcp://{host}:0")
            with caplog.at_level(logging.WARNING, logger="tts_gateway.wyoming"):
                await server.start()
            await server.stop(grace_s=1)
            names = [v.name for v in (await asyncio.to_thread(build_info, core)).tts[0].voices]
            assert names == [v["name"] for v in core.voices.all()] and names
        finally:
            await dispatcher.close()  # closes the core too

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) is warned, warnings
    if warned:
        assert "no authentication" in warnings[0]
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("192.168.1.10")
