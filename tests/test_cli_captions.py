"""``tts-gateway say … --captions FILE``: captions of the same synthesis, through the real command line (real
Piper and espeak-ng), parsed with WebVTT and SRT parsers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import soundfile as sf
import srt
import webvtt

from tests.test_cli_words import cli

TEXT = "Dr. Smith paid $42 for 3 books. Then he left, happily! Was it worth it?"
SENTENCES = ["Dr. Smith paid $42 for 3 books.", "Then he left, happily!", "Was it worth it?"]
END_TOLERANCE_S = 0.05


@pytest.mark.parametrize(("voice", "name"), [("piper:joe", "out.vtt"), ("espeak:en", "SUBS.WebVTT")])
def test_say_writes_webvtt_captions_of_its_audio(tmp_path: Path, voice: str, name: str) -> None:
    out, captions = tmp_path / "speech.wav", tmp_path / name
    said = cli(tmp_path, "say", TEXT, "--voice", voice, "--out", str(out), "--captions", str(captions),
               TTS_GATEWAY_ENGINES="piper,espeak")
    assert said.returncode == 0, said.stderr
    assert str(captions) in said.stderr
    samples, rate = sf.read(out)
    cues = webvtt.read(str(captions)).captions
    assert [cue.text.replace("\n", " ") for cue in cues] == SENTENCES
    assert all(earlier.end_in_seconds <= later.start_in_seconds for earlier, later in itertools.pairwise(cues))
    # webvtt-py's seconds are whole; the cue's text stamp has the milliseconds.
    last_end = sum(float(part) * unit for part, unit in zip(cues[-1].end.split(":"), (3600, 60, 1), strict=True))
    assert last_end == pytest.approx(len(samples) / rate, abs=END_TOLERANCE_S)


def test_say_writes_srt_by_suffix_or_by_format(tmp_path: Path) -> None:
    out = tmp_path / "speech.mp3"
    for captions, extra in ((tmp_path / "subs.srt", ()), (tmp_path / "subs.txt", ("--captions-format", "srt"))):
        said = cli(tmp_path, "say", TEXT, "--voice", "piper:joe", "--speed", "1.5", "--out", str(out),
                   "--captions", str(captions), *extra, TTS_GATEWAY_ENGINES="piper")
        assert said.returncode == 0, said.stderr
        samples, rate = sf.read(out)
        cues = list(srt.parse(captions.read_text(encoding="utf-8")))
        assert [cue.content.replace("\n", " ") for cue in cues] == SENTENCES
        assert cues[-1].end.total_seconds() == pytest.approx(len(samples) / rate, abs=END_TOLERANCE_S)


@pytest.mark.parametrize(("args", "words"), [
    (("--captions", "{tmp}/subs.txt"), "name a .vtt or .srt file"),
    (("--captions", "{tmp}/subs.vtt", "--captions-format", "ass"), "use vtt or srt"),
    (("--captions-format", "vtt"), "needs --captions"),
    (("--captions", "{tmp}/no/such/subs.vtt"), "its directory does not exist"),
])
def test_bad_captions_options_fail_before_any_work(tmp_path: Path, args: tuple[str, ...], words: str) -> None:
    out = tmp_path / "speech.wav"
    said = cli(tmp_path, "say", "Hello.", "--voice", "piper:joe", "--out", str(out),
               *(arg.format(tmp=tmp_path) for arg in args), TTS_GATEWAY_ENGINES="piper")
    assert said.returncode == 2, said.stderr
    assert words in said.stderr and not out.exists()
