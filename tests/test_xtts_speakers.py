"""Issue 15: XTTS v2 studio speakers (speakers_xtts.pth) as read-only built-in voices ``xtts:<slug>``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_problem, decode, running_app
from tts_gateway.config import Settings
from tts_gateway.engines.base import SynthesisOptions, VoiceInput
from tts_gateway.engines.tiny_xtts import TINY_SPEAKERS
from tts_gateway.engines.xtts_engine import XttsEngine
from tts_gateway.engines.xtts_speakers import SPEAKERS_FILE, SpeakerCache, StudioSpeakers, speaker_slug

pytestmark = pytest.mark.xtts

SLUGS = ["claribel-dervla", "ana-florence", "viktor-eka"]


class NotATensor:
    """Anything but tensors must be refused by torch.load(weights_only=True)."""


@pytest.mark.parametrize(("name", "slug"), [
    ("Claribel Dervla", "claribel-dervla"), ("  Ana   Florence ", "ana-florence"), ("Zoë Ångström", "zoe-angstrom"),
    ("Dr. O'Neil (studio)", "dr-oneil-studio"), ("snake_case-ok", "snake_case-ok"), ("--Lead", "lead"),
    ("日本語", ""), ("x" * 80, "x" * 64),
])
def test_speaker_slug(name: str, slug: str) -> None:
    assert speaker_slug(name) == slug


def test_speakers_file_is_read_safely_with_unique_slugs(tmp_path: Path) -> None:
    import torch

    good = {"gpt_cond_latent": torch.zeros(1, 32, 8), "speaker_embedding": torch.zeros(1, 512, 1)}
    path = tmp_path / SPEAKERS_FILE
    torch.save({"Ana Florence": good, "ana florence": good, "日本語": good, "Broken": {"gpt_cond_latent": 1}}, path)
    speakers = StudioSpeakers.read(path)
    assert list(speakers.by_slug) == ["ana-florence", "ana-florence-2", "speaker-3"]
    assert speakers.get("ana-florence-2").name == "ana florence"  # type: ignore[union-attr]

    torch.save({"Evil": NotATensor()}, path)  # a pickled object: weights_only refuses it, nothing runs
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|global"):
        StudioSpeakers.read(path)
    assert len(SpeakerCache().speakers(tmp_path)) == 0  # the engine keeps working, without studio voices


def test_listing_is_cheap_and_cached(tiny_xtts: Path) -> None:
    engine = XttsEngine(tiny_xtts)
    first = engine.voices()
    assert [v.id for v in first] == SLUGS and len(TINY_SPEAKERS) == 3
    assert not engine.loaded  # listing never loads the model
    voice = first[0]
    assert voice.language == "en" and "Claribel Dervla" in voice.description and "16" in voice.description
    assert len(voice.languages) == 16 and {"en", "de", "ja", "zh-cn"} <= set(voice.languages)
    assert voice.licence.startswith("CPML")
    cache = engine._speakers
    assert cache.speakers(tiny_xtts) is cache.speakers(tiny_xtts)  # read once per file version


@pytest.fixture(scope="module")
def speaker_client(tmp_path_factory: pytest.TempPathFactory, tiny_xtts: Path) -> Iterator[Any]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), engines=("piper", "xtts"), xtts_checkpoint=tiny_xtts,
                        max_concurrency=2, timeout_s=300, engine_threads=2)
    with running_app(settings) as client:
        yield client


def test_studio_speakers_are_builtin_voices(speaker_client: Any) -> None:
    voices = {v["name"]: v for v in speaker_client.get("/v1/voices").json()["voices"]}
    for slug in SLUGS:
        voice = voices[f"xtts:{slug}"]
        assert voice["kind"] == "builtin" and voice["engine"] == "xtts" and voice["read_only"] is True
        assert voice["status"] == "ok" and voice["licence"].startswith("CPML")
        assert voice["language"] == "en" and len(voice["languages"]) == 16 and "de" in voice["languages"]
    one = speaker_client.get("/v1/voices/xtts:ana-florence").json()
    assert one["name"] == "xtts:ana-florence" and "Ana Florence" in one["description"]
    engine = speaker_client.get("/v1/engines/xtts").json()
    assert [f"xtts:{slug}" for slug in SLUGS] == [v for v in engine["voices"] if v.startswith("xtts:")]
    assert_problem(speaker_client.delete("/v1/voices/xtts:ana-florence"), 409, "built-in")
    assert_problem(speaker_client.get("/v1/voices/xtts:nobody"), 404)


def test_synthesis_with_a_studio_speaker(speaker_client: Any) -> None:
    body = {"text": "Hello, I am a studio voice.", "voice": "xtts:claribel-dervla", "seed": 5}
    first = speaker_client.post("/v1/synthesize", json=body)
    assert first.status_code == 200, first.text
    assert first.headers["x-engine"] == "xtts" and first.headers["x-voice"] == "xtts:claribel-dervla"
    audio, rate = decode(first.content)
    assert rate == 24000 and audio.size > 2400 and float(np.abs(audio).max()) > 0
    again = speaker_client.post("/v1/synthesize", json={**body, "cache": False})
    assert again.content == first.content  # same speaker, same seed: same bytes
    other = speaker_client.post("/v1/synthesize", json={**body, "voice": "xtts:viktor-eka", "cache": False})
    assert other.status_code == 200 and other.content != first.content  # another speaker's latents
    german = speaker_client.post("/v1/synthesize", json={**body, "language": "de", "text": "Guten Tag."})
    assert german.status_code == 200, german.text  # every XTTS language
    assert_problem(speaker_client.post("/v1/synthesize", json={**body, "voice": "xtts:nobody"}), 404)
    speech = speaker_client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Hi.",
                                                            "voice": "xtts:ana-florence", "response_format": "wav"})
    assert speech.status_code == 200, speech.text


def test_speakers_are_those_of_the_checkpoint_in_use(tmp_path: Path, tiny_xtts: Path) -> None:
    """A checkpoint without speakers_xtts.pth has no studio voices (cloning still works); engine-level."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.pth", "vocab.json"):
        (bare / name).symlink_to(tiny_xtts / name)
    engine = XttsEngine(bare)
    assert engine.voices() == []
    shutil.copy(tiny_xtts / SPEAKERS_FILE, bare / SPEAKERS_FILE)
    assert [v.id for v in engine.voices()] == SLUGS
    with pytest.raises(Exception, match="not loaded"):
        list(engine.synthesize("Hi.", VoiceInput(builtin="ana-florence"), SynthesisOptions(language="en")))


def test_a_speaker_of_an_engine_that_is_not_there_yet_is_503_not_404(make_settings: Any, tmp_path: Any) -> None:
    """Before the model is present (not downloaded yet), xtts:<speaker> says why, instead of 'unknown voice'."""
    settings = make_settings(engines=("piper", "xtts"), xtts_checkpoint=tmp_path / "not-yet")
    with running_app(settings) as client:
        problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "voice": "xtts:ana-florence"}),
                                 503, "does not exist")
        assert problem["type"].endswith("engine-unavailable")
