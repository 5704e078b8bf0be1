"""Issue 29: ``speed`` (0.25–4) is the speed the listener hears, on every engine, not what its native control
reaches (Piper's length scale does not scale every frame; espeak-ng's rate and Kokoro's speed have limits)."""

from __future__ import annotations

from typing import Any

import pytest

SPEEDS = (0.25, 0.5, 2.0, 4.0)
TOLERANCE = 0.15  # of the asked ratio: a property of the audio, not of the machine
TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


def samples(client: Any, voice: str, speed: float) -> int:
    response = client.post("/v1/synthesize", json={"text": TEXT, "voice": voice, "speed": speed, "seed": 1,
                                                   "format": "pcm", "cache": False})
    assert response.status_code == 200, response.text
    return len(response.content) // 2  # 16-bit mono


@pytest.mark.parametrize("voice", ["piper:joe", "espeak:en"])
def test_speech_is_as_fast_as_asked(client: Any, voice: str) -> None:
    """Duration at speed 1 over duration at speed s is s, within the tolerance, at both ends of the range."""
    normal = samples(client, voice, 1.0)
    ratios = {speed: normal / samples(client, voice, speed) for speed in SPEEDS}
    off = {speed: round(ratio, 3) for speed, ratio in ratios.items() if abs(ratio / speed - 1) > TOLERANCE}
    assert not off, f"{voice}: asked speed → measured ratio {off}"


def test_piper_uses_its_length_scale_where_it_is_faithful() -> None:
    """Within its range the length scale alone does it (no stretch); past it, the stretch makes up the rest."""
    from tts_gateway.engines.piper_engine import LENGTH_SCALE_RANGE, speed_plan

    assert speed_plan(1.0) == pytest.approx((1.0, 1.0))
    for speed in (0.6, 0.8, 1.2, 1.5):
        length_scale, stretch = speed_plan(speed)
        assert LENGTH_SCALE_RANGE[0] < length_scale < LENGTH_SCALE_RANGE[1] and stretch == pytest.approx(1.0)
    for speed in (0.25, 0.5, 2.0, 4.0):
        length_scale, stretch = speed_plan(speed)
        assert length_scale in LENGTH_SCALE_RANGE and stretch != pytest.approx(1.0)
