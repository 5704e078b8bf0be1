"""Limits that bound the work, checked cheaply before anything expensive runs (issue: hostile text)."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import assert_problem


def post_utf8(client: Any, body: dict[str, Any]) -> Any:
    """JSON as UTF-8 (not \\u escapes), as most clients send it: the most text a body can carry."""
    return client.post("/v1/synthesize", content=json.dumps(body, ensure_ascii=False).encode(),
                       headers={"content-type": "application/json"})


def test_stacked_combining_marks_are_refused_before_normalisation(client: Any) -> None:
    # One grapheme of 30 000 alternating combining marks (under the code-point bound): NFC on it is
    # quadratic, so it must be refused before anything normalises it.
    text = "a" + "\u0301\u0316" * 15_000
    assert_problem(post_utf8(client, {"text": text}), 422, "combining marks")
    # A huge one is refused by the JSON body's size bound, before it is even parsed.
    assert_problem(post_utf8(client, {"text": "a" + "\u0301\u0316" * 100_000}), 413, "JSON body")
    # Ordinary accented text of every script still passes.
    ok = client.post("/v1/synthesize", json={"text": "Tiếng Việt có dấu. Ça va? Ñandú.", "voice": "espeak:vi"})
    assert ok.status_code == 200, ok.text


def test_emoji_are_counted_as_what_is_spoken(client: Any) -> None:
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466"
    body = post_utf8(client, {"text": family * 2000})  # 2000 characters, 14 000 code points
    assert_problem(body, 422, "spoken as about", "TTS_GATEWAY_MAX_TEXT_CHARS")
    assert client.post("/v1/synthesize", json={"text": f"Hello {family}!"}).status_code == 200


def test_code_points_bound_the_work_before_graphemes_are_counted(client: Any) -> None:
    assert_problem(client.post("/v1/synthesize", json={"text": "x" * 40_001}), 422, "code points")


def test_invisible_only_text_has_nothing_to_speak(client: Any) -> None:
    for text in ("\u200b\u200b\u200b", "\u2060 \u200d", "\u0301\u0301"):
        assert_problem(client.post("/v1/synthesize", json={"text": text}), 422, "nothing to speak")


def test_a_huge_language_code_is_not_echoed_back(client: Any) -> None:
    problem = assert_problem(client.post("/v1/synthesize", json={"text": "hi", "language": "x" * 10_000}), 422)
    assert len(problem["detail"]) < 1000


def test_text_that_only_mentions_nan_is_fine_and_a_bare_nan_is_a_bad_value(client: Any) -> None:
    assert client.post("/v1/synthesize", json={"text": ": NaN is not a number"}).status_code == 200
    body = b'{"text": "hi", "speed": NaN}'
    response = client.post("/v1/synthesize", content=body, headers={"content-type": "application/json"})
    assert_problem(response, 422, "speed", "finite")


def test_a_form_with_too_many_parts_names_the_limit(client: Any) -> None:
    files = {f"field{i}": (None, "x") for i in range(1500)}
    assert_problem(client.post("/v1/voices", files=files), 413, "too many parts", "1000")
