"""Issue 33: the SSML subset. Breaks are real silence of the asked length in the decoded audio, prosody
rate changes a segment's speed, say-as/sub/lang change what is said, and hostile or unsupported SSML is
refused with a 422 naming the element and its position (DTDs and entities never expanded)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from tests.conftest import HANG_GUARD_S, ROOT, assert_problem, decode, free_port, running_app, uvicorn_server
from tests.fake_engine import RATE as FAKE_RATE
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.config import Settings
from tts_gateway.core.frontend import prepare
from tts_gateway.core.frontend.segments import Segment
from tts_gateway.engines.base import BuiltinVoice

TOLERANCE_S = 0.020


def silent_runs(samples: np.ndarray, rate: int, threshold: float = 1e-3, shortest_s: float = 0.05) -> list[float]:
    """Lengths (seconds) of the runs of near-silence at least ``shortest_s`` long, in order."""
    quiet = np.abs(samples) < threshold
    runs, start = [], None
    for index, is_quiet in enumerate(np.append(quiet, False)):
        if is_quiet and start is None:
            start = index
        elif not is_quiet and start is not None:
            if index - start >= shortest_s * rate:
                runs.append((index - start) / rate)
            start = None
    return runs


def ssml(client: Any, document: str, **fields: Any) -> tuple[np.ndarray, int]:
    response = client.post("/v1/synthesize", json={"text": document, "text_format": "ssml", "format": "wav",
                                                   "cache": False, **fields})
    assert response.status_code == 200, response.text
    return decode(response.content)


# -- parsing ------------------------------------------------------------------------------------------
def test_ssml_becomes_segments_with_pauses_rates_and_languages() -> None:
    spoken = prepare('<speak><s>Hello <break time="750ms"/> world.</s><s>Again.</s>'
                     '<prosody rate="slow">Slowly</prosody><break strength="strong"/></speak>',
                     "en", text_format="ssml")
    assert spoken.segments == (Segment("Hello"), Segment("world.", 0.75), Segment("Again."),
                               Segment("Slowly", None, 0.75))
    assert spoken.pause_after == 0.75


def test_say_as_sub_and_phoneme_say_what_they_mean() -> None:
    spoken = prepare('<speak><say-as interpret-as="characters">ABC</say-as> '
                     '<say-as interpret-as="ordinal">3</say-as> <say-as interpret-as="cardinal">42</say-as> '
                     '<say-as interpret-as="date" format="dmy">12/05/2026</say-as> '
                     '<say-as interpret-as="time">15:30</say-as> <say-as interpret-as="telephone">555 1234</say-as> '
                     '<sub alias="World Wide Web">WWW</sub> <phoneme alphabet="ipa" ph="təˈmeɪtoʊ">tomato</phoneme>'
                     '</speak>', "en", text_format="ssml")
    assert spoken.text == ("A B C third forty-two May twelfth twenty twenty-six fifteen thirty "
                           "five five five, one two three four World Wide Web tomato")
    ipa = prepare('<speak>A <phoneme alphabet="ipa" ph="təˈmeɪtoʊ">tomato</phoneme>.</speak>', "en",
                  text_format="ssml", phonemes=True)
    assert ipa.text == "A [[təˈmeɪtoʊ]] ."


def test_lang_applies_only_where_the_voice_speaks_it() -> None:
    document = '<speak>Hi <lang xml:lang="de">Ich habe 2</lang></speak>'
    spoken = prepare(document, "en", text_format="ssml", speaks=lambda code: code if code == "de" else None)
    assert spoken.segments[1] == Segment("Ich habe zwei", 0.0, 1.0, "de")
    unspoken = prepare(document, "en", text_format="ssml", speaks=lambda code: None)
    assert unspoken.segments[1] == Segment("Ich habe two", 0.0, 1.0, None)
    whole = prepare('<speak xml:lang="de">Ich habe 2</speak>', "en", text_format="ssml", speaks=lambda code: code)
    assert whole.segments == (Segment("Ich habe zwei", None, 1.0, "de"),)


# -- breaks in the audio ------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds", [0.3, 0.75, 1.5])
def test_a_break_is_silence_of_its_length_exactly(fake_client: Any, seconds: float) -> None:
    """The fake engine speaks a tone with no silence of its own: the only silence is the break."""
    audio, rate = ssml(fake_client, f'<speak>One<break time="{int(seconds * 1000)}ms"/>two</speak>')
    assert rate == FAKE_RATE
    runs = silent_runs(audio, rate)
    assert len(runs) == 1 and abs(runs[0] - seconds) <= TOLERANCE_S, runs


def test_breaks_at_both_ends_and_in_a_row(fake_client: Any) -> None:
    audio, rate = ssml(fake_client, '<speak><break time="400ms"/>One<break time="200ms"/><break time="300ms"/>'
                                    'two<break time="600ms"/></speak>')
    runs = silent_runs(audio, rate)
    assert len(runs) == 3 and all(abs(a - b) <= TOLERANCE_S for a, b in zip(runs, [0.4, 0.5, 0.6], strict=True)), runs


def test_sentences_keep_the_usual_pause_and_a_break_replaces_it(fake_client: Any) -> None:
    audio, rate = ssml(fake_client, '<speak><s>One.</s><s>Two.</s><break time="900ms"/><s>Three.</s></speak>')
    runs = silent_runs(audio, rate)
    assert len(runs) == 2 and abs(runs[0] - 0.2) <= TOLERANCE_S and abs(runs[1] - 0.9) <= TOLERANCE_S, runs


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_a_break_adds_its_length_of_silence_on_real_engines(client: Any, voice: str) -> None:
    """A real engine pads its own speech with some silence: a break 1 s longer makes the gap 1 s longer."""
    gaps = []
    for milliseconds in (200, 1200):
        audio, rate = ssml(client, f'<speak>Good morning<break time="{milliseconds}ms"/>my friend</speak>',
                           voice=voice, seed=1)
        gaps.append(max(silent_runs(audio, rate, threshold=0.01)))
    assert abs(gaps[1] - gaps[0] - 1.0) <= TOLERANCE_S, gaps


def test_prosody_rate_changes_the_speed_of_its_segment_only(fake_client: Any) -> None:
    plain, _ = ssml(fake_client, "<speak>Slow words</speak>")
    slow, _ = ssml(fake_client, '<speak><prosody rate="50%">Slow words</prosody></speak>')
    fast, _ = ssml(fake_client, '<speak><prosody rate="x-fast">Slow words</prosody></speak>')
    assert len(slow) / len(plain) == pytest.approx(2.0, rel=0.05)
    assert len(plain) / len(fast) == pytest.approx(1.75, rel=0.05)


def test_prosody_rate_outside_the_speed_range_is_refused(fake_client: Any) -> None:
    response = fake_client.post("/v1/synthesize", json={
        "text": '<speak><prosody rate="500%">Hi</prosody></speak>', "text_format": "ssml"})
    assert_problem(response, 422, "prosody", "line 1, column 8")


# -- refusals -----------------------------------------------------------------------------------------
BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                            for i in range(1, 10))
                  + ']><speak>&lol9;</speak>')
EXTERNAL = '<?xml version="1.0"?><!DOCTYPE speak [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><speak>&xxe;</speak>'
NESTED = "<speak>" + "<s>" * 10_000 + "deep" + "</s>" * 10_000 + "</speak>"

REFUSED = [
    ("billion laughs", BILLION_LAUGHS, ("DOCTYPE", "refused", "line 1")),
    ("external entity", EXTERNAL, ("DOCTYPE", "refused", "line 1")),
    ("10 000 nested tags", NESTED, ("<s>", "nested", "line 1, column")),
    ("unsupported element", '<speak>Hi <audio src="x.wav"/></speak>',
     ("<audio>", "not supported", "line 1, column 11")),
    ("malformed", "<speak>Hi <s>there</speak>", ("not well-formed", "line 1, column")),
    ("no speak root", "<s>Hi</s>", ("<s>", "<speak>", "line 1, column 1")),
    ("bad break time", '<speak>\n<break time="soon"/></speak>', ("<break", "line 2, column 1")),
    ("bad say-as", '<speak><say-as interpret-as="colour">red</say-as></speak>', ("say-as", "line 1, column 8")),
    ("say-as that does not fit", '<speak><say-as interpret-as="cardinal">many</say-as></speak>', ("say-as", "many")),
    ("sub without alias", "<speak><sub>WWW</sub></speak>", ("<sub>", "alias")),
    ("too much silence", "<speak>" + '<break time="10s"/>' * 7 + "Hi</speak>", ("<break>", "more than 60s")),
    ("phoneme with brackets", '<speak><phoneme ph="a]]b">x</phoneme></speak>', ("<phoneme>", "IPA")),
    ("plain text as ssml", "Hello there", ("not well-formed", "line 1, column 1")),
]


@pytest.fixture(scope="module")
def roomy_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The fake engine with room for 100 000 characters of text, so 10 000 nested tags reach the SSML parser."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("roomy"), engines=(), default_voice="fake:one",
                        max_text_chars=100_000)
    with running_app(settings, FakePlugin(FakeEngine())) as test_client:
        yield test_client


@pytest.mark.parametrize(("label", "document", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_hostile_or_unsupported_ssml_is_a_422_naming_element_and_position(
        roomy_client: Any, label: str, document: str, words: tuple[str, ...]) -> None:
    response = roomy_client.post("/v1/synthesize", json={"text": document, "text_format": "ssml"})
    body = assert_problem(response, 422, "SSML", *words)
    assert body["type"].endswith("invalid-ssml")


def test_the_openai_route_and_the_dry_run_take_ssml_too(fake_client: Any) -> None:
    speech = fake_client.post("/v1/audio/speech", json={
        "input": '<speak>One<break time="500ms"/>two</speak>', "text_format": "ssml", "response_format": "wav",
        "voice": "fake:one"})
    assert speech.status_code == 200, speech.text
    runs = silent_runs(*decode(speech.content))
    assert len(runs) == 1 and abs(runs[0] - 0.5) <= TOLERANCE_S, runs
    assert_problem(fake_client.post("/v1/audio/speech", json={"input": EXTERNAL, "text_format": "ssml"}), 422,
                   "DOCTYPE")
    dry = fake_client.post("/v1/text/normalize", json={
        "text": '<speak>I owe $5<break time="250ms"/><prosody rate="slow">later</prosody></speak>',
        "language": "en", "text_format": "ssml"})
    assert dry.status_code == 200, dry.text
    assert [(p["text"], p["pause_before"], p["speed"]) for p in dry.json()["pieces"]] == [
        ("I owe five dollars", 0.0, 1.0), ("later", 0.25, 0.75)]


def test_an_unknown_text_format_is_a_422(fake_client: Any) -> None:
    assert_problem(fake_client.post("/v1/synthesize", json={"text": "Hi", "text_format": "html"}), 422, "text_format")


# -- Wyoming ------------------------------------------------------------------------------------------
async def _wyoming_pcm(port: int, data: dict[str, Any]) -> tuple[bytes, str | None]:
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=HANG_GUARD_S, read_timeout=HANG_GUARD_S) as client:
        await client.write_event(Event(type="synthesize", data=data))
        pcm, error = b"", None
        while True:
            event = await client.read_event()
            assert event is not None
            if event.type == "audio-chunk":
                pcm += event.payload or b""
            elif event.type == "error":
                error = str((event.data or {}).get("text"))
            if event.type == "audio-stop":
                return pcm, error


def test_wyoming_synthesize_takes_ssml_when_the_client_asks(tmp_path: Any) -> None:
    port = free_port()
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "espeak",
           "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en", "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{port}",
           "PYTHONPATH": str(ROOT)}
    with uvicorn_server(env):
        gaps = []
        for milliseconds in (200, 1200):
            pcm, error = asyncio.run(_wyoming_pcm(port, {
                "text": f'<speak>Good morning<break time="{milliseconds}ms"/>my friend</speak>',
                "text_format": "ssml", "voice": {"name": "espeak:en"}}))
            assert error is None, error
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
            gaps.append(max(silent_runs(samples, 22050, threshold=0.01)))
        assert abs(gaps[1] - gaps[0] - 1.0) <= TOLERANCE_S, gaps
        _, error = asyncio.run(_wyoming_pcm(port, {"text": EXTERNAL, "text_format": "ssml"}))
        assert error is not None and "DOCTYPE" in error


class BilingualEngine(FakeEngine):
    """The fake engine with one voice that speaks English and German."""

    def voices(self) -> list[BuiltinVoice]:
        return [BuiltinVoice("one", "en", "speaks en and de", languages=("en", "de"))]


def test_lang_reaches_the_engine_only_in_a_language_the_voice_speaks(make_settings: Any) -> None:
    document = '<speak>I have 2. <lang xml:lang="de-DE">Ich habe 2.</lang> <lang xml:lang="fr">J\'ai 2.</lang></speak>'
    with running_app(make_settings(engines=(), default_voice="fake:one"), FakePlugin(BilingualEngine())) as client:
        dry = client.post("/v1/text/normalize", json={"text": document, "language": "en", "text_format": "ssml"})
        assert dry.status_code == 200, dry.text
        assert [(p["text"], p["language"]) for p in dry.json()["pieces"]] == [
            ("I have two.", "en"), ("Ich habe zwei.", "de"), ("J'ai two.", "en")]
        spoken = client.post("/v1/synthesize", json={"text": document, "text_format": "ssml", "format": "pcm"})
        assert spoken.status_code == 200, spoken.text
