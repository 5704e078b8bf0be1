"""Issue 33: the pronunciation lexicon. Entries are kept durably (a file, or PostgreSQL), changed only with
the admin scope, matched as whole words with case, applied on every engine and every front door (HTTP,
OpenAI, the old /synthesize, Wyoming, the CLI, the phrase cache key), and a preset's own entries win."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from tests.conftest import (
    HANG_GUARD_S,
    ROOT,
    assert_problem,
    free_port,
    register,
    running_app,
    uvicorn_server,
    voice_audio,
    wait_for_warm_up,
    wait_until,
    wav,
)
from tests.fake_cloning_plugin import RATE as CLONE_RATE
from tests.fake_cloning_plugin import FakeCloningEngine
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.config import Settings
from tts_gateway.core.frontend.lexicon import respell
from tts_gateway.voices.lexicon import LexiconEntry, LocalLexicon

pytest_plugins = ["tests.pg_fixtures"]  # the postgres and pg_url fixtures

WRITTEN, RESPELLED = "Nginx is up.", "engine ex is up."


def pcm(client: Any, text: str, voice: str, **fields: Any) -> Any:
    response = client.post("/v1/synthesize", json={"text": text, "voice": voice, "format": "pcm", "seed": 1,
                                                   "cache": False, **fields})
    assert response.status_code == 200, response.text
    return response


# -- matching -----------------------------------------------------------------------------------------
def test_matching_is_whole_word_and_case_aware() -> None:
    entries = {"nginx": LexiconEntry("nginx", "en", "engine ex"), "US": LexiconEntry("US", "en", "you ess"),
               "Dr.": LexiconEntry("Dr.", "en", "Drive")}
    text, applied = respell("Nginx and NGINX and nginxes; the US told us; Dr. Who", entries)
    assert text == "engine ex and engine ex and nginxes; the you ess told us; Drive Who"
    assert applied == ["nginx", "US", "Dr."]
    japanese = {"GPU": LexiconEntry("GPU", "ja", "ジーピーユー"), "東京": LexiconEntry("東京", "ja", "とうきょう")}
    assert respell("新しいGPUで東京へ", japanese)[0] == "新しいジーピーユーでとうきょうへ"


# -- the endpoints ------------------------------------------------------------------------------------
def test_put_get_delete_and_their_errors(fake_client: Any) -> None:
    created = fake_client.put("/v1/lexicon/en/nginx", json={"respelling": "engine x"})
    assert created.status_code == 201 and created.json() == {"word": "nginx", "language": "en",
                                                             "respelling": "engine x"}
    replaced = fake_client.put("/v1/lexicon/en-US/nginx", json={"respelling": "engine ex"})  # en-US is en's
    assert replaced.status_code == 200
    assert fake_client.get("/v1/lexicon/en/nginx").json()["respelling"] == "engine ex"
    ipa = fake_client.put("/v1/lexicon/en/tomato", json={"ipa": "təˈmɑːtəʊ"})
    assert ipa.status_code == 201 and ipa.json()["ipa"] == "təˈmɑːtəʊ"
    assert fake_client.delete("/v1/lexicon/en/nginx").status_code == 204
    assert_problem(fake_client.get("/v1/lexicon/en/nginx"), 404, "no en entry", "nginx")
    assert_problem(fake_client.delete("/v1/lexicon/en/nginx"), 404, "nginx")
    assert_problem(fake_client.put("/v1/lexicon/english/x", json={"respelling": "y"}), 422, "language")
    assert_problem(fake_client.put("/v1/lexicon/en/x", json={"respelling": "y", "ipa": "z"}), 422, "exactly one")
    assert_problem(fake_client.put("/v1/lexicon/en/x", json={}), 422, "exactly one")
    assert_problem(fake_client.put("/v1/lexicon/en/x", json={"respelling": "<b>"}), 422, "respelling")
    assert_problem(fake_client.put("/v1/lexicon/en/x", json={"respelling": "y", "extra": 1}), 422)
    assert_problem(fake_client.put("/v1/lexicon/en/%3Fx%3F", json={"respelling": "y"}), 422, "word")
    assert_problem(fake_client.put("/v1/lexicon/en/x?voice=nobody", json={"respelling": "y"}), 404, "nobody")
    assert_problem(fake_client.put("/v1/lexicon/en/x?voice=fake:one", json={"respelling": "y"}), 422, "built-in")


def test_changing_the_lexicon_needs_the_admin_scope(make_settings: Any) -> None:
    keys = Settings.from_env({"TTS_GATEWAY_API_KEYS": "adm-1:admin,syn-2:synthesize"}).api_keys
    with running_app(make_settings(engines=(), default_voice="fake:one", api_keys=keys),
                     FakePlugin(FakeEngine())) as client:
        admin, synth = {"Authorization": "Bearer adm-1"}, {"Authorization": "Bearer syn-2"}
        assert_problem(client.put("/v1/lexicon/en/nginx", json={"respelling": "x"}), 401)
        assert_problem(client.put("/v1/lexicon/en/nginx", json={"respelling": "x"}, headers=synth), 403, "admin")
        assert client.put("/v1/lexicon/en/nginx", json={"respelling": "x"}, headers=admin).status_code == 201
        assert_problem(client.get("/v1/lexicon/en/nginx", headers=synth), 403, "admin")
        assert_problem(client.delete("/v1/lexicon/en/nginx", headers=synth), 403, "admin")
        dry = client.post("/v1/text/normalize", json={"text": "nginx", "language": "en"}, headers=synth)
        assert dry.status_code == 200 and dry.json()["lexicon"] == ["nginx"]


# -- durable ------------------------------------------------------------------------------------------
def test_entries_survive_a_restart(make_settings: Any) -> None:
    settings = make_settings(engines=(), default_voice="fake:one")
    with running_app(settings, FakePlugin(FakeEngine())) as client:
        assert client.put("/v1/lexicon/de/nginx", json={"respelling": "engin eks"}).status_code == 201
    with running_app(settings, FakePlugin(FakeEngine())) as client:
        assert client.get("/v1/lexicon/de/nginx").json()["respelling"] == "engin eks"
    assert sorted(p.name for p in settings.data_dir.glob("*lexicon*")) == ["lexicon.json"]  # no temp file left


def test_a_damaged_lexicon_file_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "lexicon.json").write_text("{not json")
    lexicon = LocalLexicon(tmp_path)
    assert lexicon.entries("en") == {}
    assert (tmp_path / "lexicon.damaged.json").exists()
    assert lexicon.put(LexiconEntry("nginx", "en", "engine ex"))
    assert LocalLexicon(tmp_path).get("en", "nginx").respelling == "engine ex"


@pytest.mark.postgres
def test_postgres_mode_shares_entries_between_nodes_and_keeps_them(make_settings: Any, pg_url: str,
                                                                   tmp_path: Path) -> None:
    one = make_settings(engines=(), default_voice="fake:one", registry_url=pg_url, data_dir=tmp_path / "one")
    two = one.with_(data_dir=tmp_path / "two")
    with running_app(one, FakePlugin(FakeEngine())) as first, running_app(two, FakePlugin(FakeEngine())) as second:
        assert first.put("/v1/lexicon/en/nginx", json={"respelling": "engine ex"}).status_code == 201
        assert second.get("/v1/lexicon/en/nginx").json()["respelling"] == "engine ex"
        # Synthesis on the other node reads a snapshot refreshed in the background: it sees the entry soon.
        wait_until(lambda: second.post("/v1/text/normalize", json={"text": WRITTEN, "language": "en"}).json()["text"]
                   == RESPELLED, "node two speaks node one's new entry")
        assert second.put("/v1/lexicon/en/nginx", json={"ipa": "ˈɛndʒɪn ɛks"}).status_code == 200
        assert first.get("/v1/lexicon/en/nginx").json() == {"word": "nginx", "language": "en", "ipa": "ˈɛndʒɪn ɛks"}
        assert second.delete("/v1/lexicon/en/nginx").status_code == 204
        assert_problem(first.get("/v1/lexicon/en/nginx"), 404)
        assert first.put("/v1/lexicon/en/kept", json={"respelling": "still here"}).status_code == 201
    with running_app(two, FakePlugin(FakeEngine())) as again:
        assert again.get("/v1/lexicon/en/kept").json()["respelling"] == "still here"


# -- applied everywhere -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines_client(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("lexicon-data"), engines=("piper", "espeak", "xtts", "kokoro"),
                        xtts_checkpoint=tiny_xtts, max_concurrency=2, timeout_s=120)
    with running_app(settings, FakePlugin(FakeEngine())) as client:
        wait_for_warm_up(client)
        assert client.put("/v1/lexicon/en/nginx", json={"respelling": "engine ex"}).status_code in (200, 201)
        assert client.put("/v1/lexicon/ja/GPU", json={"respelling": "ジーピーユー"}).status_code in (200, 201)
        yield client


def _builtin(client: Any, engine: str, language: str) -> str:
    listing = client.get("/v1/engines/" + engine).json()
    if not listing["available"]:
        pytest.skip(f"{engine} is unavailable here: {listing['reason']}")
    voices = [v["name"] for v in client.get("/v1/voices").json()["voices"]
              if v["name"].startswith(engine + ":") and str(v.get("language", "")).startswith(language)]
    assert voices, f"{engine} has no {language} voice"
    return voices[0]


# (engine, language, written, respelled): Kokoro's voices here may be Japanese only.
ENGINES = [("piper", "en", WRITTEN, RESPELLED), ("espeak", "en", WRITTEN, RESPELLED),
           ("xtts", "en", WRITTEN, RESPELLED), ("fake", "en", WRITTEN, RESPELLED),
           ("kokoro", "ja", "GPUです。", "ジーピーユーです。")]


@pytest.mark.xtts
@pytest.mark.parametrize(("engine", "language", "written", "respelled"), ENGINES, ids=[e[0] for e in ENGINES])
def test_every_engine_speaks_the_respelling(engines_client: Any, engine: str, language: str, written: str,
                                            respelled: str) -> None:
    """With the same seed, the written word gives exactly the audio of its respelling."""
    voice = _builtin(engines_client, engine, language)
    said = pcm(engines_client, written, voice, language=language)
    assert said.headers["x-lexicon"] in ("nginx", "GPU")
    assert said.content == pcm(engines_client, respelled, voice, language=language).content
    dry = engines_client.post("/v1/text/normalize", json={"text": written, "language": language, "voice": voice})
    assert dry.json()["text"] == respelled and dry.json()["engine"] == engine


def test_ipa_entries_reach_the_engines_that_take_phonemes(client: Any) -> None:
    """Piper takes IPA (as [[ … ]]): the word is spoken from its phonemes. espeak-ng takes its own phoneme
    names: the IPA is turned into them, so the word sounds exactly as espeak-ng says "engine ex"."""
    as_written = {voice: pcm(client, WRITTEN, voice).content for voice in ("piper:joe", "espeak:en")}
    assert client.put("/v1/lexicon/en/nginx", json={"ipa": "ˈɛndʒɪn ˈɛks"}).status_code == 201
    piper = pcm(client, WRITTEN, "piper:joe")
    assert piper.headers["x-lexicon"] == "nginx" and piper.content != as_written["piper:joe"]
    assert piper.content == pcm(client, "[[ˈɛndʒɪn ˈɛks]] is up.", "piper:joe", normalize=False).content
    espeak = pcm(client, WRITTEN, "espeak:en")
    assert espeak.headers["x-lexicon"] == "nginx" and espeak.content != as_written["espeak:en"]
    assert espeak.content == pcm(client, RESPELLED, "espeak:en").content
    dry = {voice: client.post("/v1/text/normalize", json={"text": WRITTEN, "language": "en", "voice": voice}).json()
           for voice in ("piper:joe", "espeak:en")}
    assert dry["piper:joe"]["text"] == dry["espeak:en"]["text"] == "[[ˈɛndʒɪn ˈɛks]] is up."
    ssml = '<speak><phoneme alphabet="ipa" ph="ˈɛndʒɪn ˈɛks">Nginx</phoneme> is up.</speak>'
    for voice, heard in (("piper:joe", piper), ("espeak:en", espeak)):
        assert pcm(client, ssml, voice, text_format="ssml").content == heard.content
        timed = client.post("/v1/synthesize", json={"text": WRITTEN, "voice": voice, "timestamps": "word"})
        assert timed.status_code == 200, timed.text
        words = timed.json()["words"]
        assert [w["text"] for w in words] == ["Nginx", "is", "up"] and words[0]["end"] > words[0]["start"]


@pytest.mark.parametrize(("language", "words"), [
    ("en", "tomato hello thought church judge vision sing yes bird father boy cow water away computer"),
    ("de", "möchte Bücher schön Straße Mädchen"),  # not vowel-initial: espeak-ng adds a glottal onset to text
    ("fr", "bonjour un vin blanc rue heureux"),
    ("es", "perro pero calle niño"),
])
def test_ipa_becomes_the_phonemes_espeak_ng_itself_would_use(language: str, words: str) -> None:
    """espeak-ng's own IPA for a word, turned into its phoneme names, is read back as the phonemes it gives
    the word itself (espeak-ng -x): the conversion loses nothing espeak-ng distinguishes."""
    import shutil
    import subprocess

    from tts_gateway.engines.espeak_phonemes import espeak_text

    binary = shutil.which("espeak-ng")
    if binary is None:
        pytest.skip("espeak-ng is not installed")

    def espeak(*args: str, text: str) -> str:
        return subprocess.run([binary, "-q", "-v", language, *args], input=text, capture_output=True, text=True,
                              check=True, timeout=60).stdout.replace(" ", "").strip()

    for word in words.split():
        ipa = espeak("--ipa", text=word)
        assert espeak("-x", text=espeak_text(f"[[{ipa}]]", language)) == espeak("-x", text=word), (word, ipa)


@pytest.mark.xtts
def test_the_openai_route_and_the_old_synthesize_call_apply_it(engines_client: Any, speech_wav: bytes) -> None:
    speech = engines_client.post("/v1/audio/speech", json={"input": WRITTEN, "voice": "espeak:en",
                                                           "response_format": "pcm"})
    assert speech.status_code == 200 and speech.headers["x-lexicon"] == "nginx"
    plain = engines_client.post("/v1/audio/speech", json={"input": RESPELLED, "voice": "espeak:en",
                                                          "response_format": "pcm"})
    assert speech.content == plain.content
    legacy = engines_client.post("/synthesize", data={"text": WRITTEN, "language": "en"},
                                 files={"speaker_audio": ("ref.wav", speech_wav, "audio/wav")})
    assert legacy.status_code == 200, legacy.text
    assert legacy.headers["x-lexicon"] == "nginx"


def test_the_phrase_cache_key_follows_the_lexicon(fake_client: Any) -> None:
    def say() -> Any:
        response = fake_client.post("/v1/synthesize", json={"text": "Nginx rocks.", "format": "pcm"})
        assert response.status_code == 200
        return response

    assert say().headers["x-cache"] == "miss" and say().headers["x-cache"] == "hit"
    assert fake_client.put("/v1/lexicon/en/nginx", json={"respelling": "engine ex"}).status_code == 201
    changed = say()
    assert changed.headers["x-cache"] == "miss" and changed.headers["x-lexicon"] == "nginx"


def test_a_presets_own_entries_win_over_the_gateways(make_settings: Any) -> None:
    """The fake cloning engine speaks 0.2 s per word: the respelling's word count is heard in the length."""
    with running_app(make_settings(engines=(), default_voice="clone:none"), FakePlugin(FakeCloningEngine())) as client:
        assert register(client, "anna", wav(voice_audio()), engine="clone").status_code == 201

        def words() -> float:
            response = client.post("/v1/synthesize", json={"text": "Nginx", "voice": "anna", "format": "pcm"})
            assert response.status_code == 200, response.text
            return len(response.content) / 2 / CLONE_RATE / 0.2

        assert words() == pytest.approx(1)
        assert client.put("/v1/lexicon/en/nginx", json={"respelling": "engine ex"}).status_code == 201
        assert words() == pytest.approx(2)
        assert client.put("/v1/lexicon/en/nginx?voice=anna", json={"respelling": "en gin ex"}).status_code == 201
        assert words() == pytest.approx(3)
        assert client.get("/v1/lexicon/en/nginx?voice=anna").json()["voice"] == "anna"
        assert client.delete("/v1/voices/anna").status_code == 204
        assert register(client, "anna", wav(voice_audio()), engine="clone").status_code == 201
        assert words() == pytest.approx(2)  # a new preset of the same name starts with no entries of its own


async def _wyoming_pcm(port: int, text: str) -> bytes:
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=HANG_GUARD_S, read_timeout=HANG_GUARD_S) as client:
        await client.write_event(Event(type="synthesize", data={"text": text, "voice": {"name": "espeak:en"}}))
        audio = b""
        while True:
            event = await client.read_event()
            assert event is not None and event.type != "error", event
            if event.type == "audio-chunk":
                audio += event.payload or b""
            if event.type == "audio-stop":
                return audio


def test_wyoming_and_the_cli_apply_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {"TTS_GATEWAY_DATA_DIR": str(data), "TTS_GATEWAY_ENGINES": "espeak", "TTS_GATEWAY_DEFAULT_VOICE": "espeak:en",
           "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    with uvicorn_server(env) as base:
        import httpx

        assert httpx.put(f"{base}/v1/lexicon/en/nginx", json={"respelling": "engine ex"}).status_code == 201
        assert asyncio.run(_wyoming_pcm(port, WRITTEN)) == asyncio.run(_wyoming_pcm(port, RESPELLED))
    cli_env = {**os.environ, **env, "TTS_GATEWAY_WYOMING_URI": ""}
    outputs = []
    for index, text in enumerate((WRITTEN, RESPELLED)):
        out = tmp_path / f"say{index}.wav"
        subprocess.run([sys.executable, "-m", "tts_gateway", "say", text, "--voice", "espeak:en", "--out", str(out)],
                       env=cli_env, check=True, capture_output=True, timeout=HANG_GUARD_S)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    ssml = tmp_path / "ssml.wav"
    subprocess.run([sys.executable, "-m", "tts_gateway", "say", f"<speak>{WRITTEN}</speak>", "--ssml", "--voice",
                    "espeak:en", "--out", str(ssml)],
                   env=cli_env, check=True, capture_output=True, timeout=HANG_GUARD_S)
    assert ssml.read_bytes() == outputs[1]


def test_speech_goes_on_without_the_lexicon_while_its_database_is_down(tmp_path: Path) -> None:
    """Synthesis reads entries from memory: an unreachable database gives no entries, never an error."""
    from tts_gateway.voices.pg_lexicon import PostgresLexicon

    port = free_port()  # nothing listens here
    lexicon = PostgresLexicon(f"postgresql://nobody:none@127.0.0.1:{port}/none")
    try:
        assert lexicon.entries("en") == {}
        assert lexicon.entries("en", scope="anna") == {}
    finally:
        lexicon.close()
