"""The playground highlights each word as it is heard and offers the captions, in headless Debian Chromium
against a real server: words with Piper, sentences with an engine that gives no word timings."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import HANG_GUARD_S, uvicorn_server, voice_audio, wait_until, wav
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS, HANG_GUARD_MS, _duration_js
from tts_gateway.engines.timing import input_words

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TEXT = "Hello from the playground. The word you hear is the word that is lit, one after another."


def _playwright() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (playwright cannot download its own browsers here)")
    sync_api.expect.set_options(timeout=HANG_GUARD_MS)
    return sync_api


def _lit(page: Any) -> str | None:
    return page.evaluate("() => { const el = document.querySelector('#transcript .current'); "
                         "return el ? el.textContent : null; }")


def _cues(page: Any) -> list[dict[str, Any]]:
    return page.locator("#transcript .cue").evaluate_all(
        "els => els.map(e => ({text: e.textContent, start: +e.dataset.start, end: +e.dataset.end}))")


def _seek(page: Any, seconds: float) -> str | None:
    page.evaluate("""(t) => new Promise((resolve) => {
        const player = document.getElementById("player");
        player.addEventListener("seeked", () => resolve(), {once: true});
        player.currentTime = t;
    })""", seconds)
    return _lit(page)


def test_playground_lights_each_word_as_it_is_heard_and_offers_webvtt(tmp_path: Path) -> None:
    sync_api = _playwright()
    import webvtt

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,espeak"}
    args = [*CHROMIUM_ARGS, "--autoplay-policy=no-user-gesture-required"]
    with uvicorn_server(env) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(HANG_GUARD_MS)
            page.goto(base + "/")
            sync_api.expect(page.locator("#voice option[value='piper:joe']")).to_have_count(1)
            page.locator("#voice").select_option("piper:joe")
            page.fill("#text", TEXT)
            page.click("#speak")
            sync_api.expect(page.locator("#status")).to_have_class("ok")
            sync_api.expect(page.locator("#status")).to_contain_text("word timings")
            assert page.locator("#transcript").get_attribute("data-level") == "word"
            cues = _cues(page)
            assert [cue["text"] for cue in cues] == [word.text for word in input_words(TEXT)]
            # The transcript reads as the text typed, punctuation and all.
            assert page.locator("#transcript").inner_text() == TEXT
            duration = page.evaluate(_duration_js())

            # While it plays, the lit word moves on (autoplay is allowed here; the hang guard bounds the wait).
            page.evaluate("() => document.getElementById('player').play()")
            seen: set[str] = set()

            def moved_on() -> bool:
                lit = _lit(page)
                if lit is not None:
                    seen.add(lit)
                return len(seen) >= 3

            wait_until(moved_on, "three different words lit while the audio plays", timeout=HANG_GUARD_S)
            page.evaluate("() => document.getElementById('player').pause()")

            # At each word's time that word is lit; before the first word, none is.
            for index in (0, 3, len(cues) - 1):
                assert _seek(page, (cues[index]["start"] + cues[index]["end"]) / 2) == cues[index]["text"]
            if cues[0]["start"] > 0.01:
                assert _seek(page, 0.0) is None
            assert cues[-1]["end"] == pytest.approx(duration, abs=0.05)

            # Clicking a word plays from it.
            page.locator("#transcript .cue").nth(5).click()
            assert page.evaluate("() => document.getElementById('player').currentTime") >= cues[5]["start"] - 0.01

            # The captions download is WebVTT of the same speech.
            link = page.locator("#captions-download")
            sync_api.expect(link).to_be_visible()
            with page.expect_download() as info:
                link.click()
            saved = tmp_path / "speech.vtt"
            info.value.save_as(saved)
            assert info.value.suggested_filename == "speech.vtt"
            captions = webvtt.read(str(saved)).captions
            assert " ".join(c.text.replace("\n", " ") for c in captions) == TEXT
            assert captions[0].start_in_seconds <= cues[0]["start"] + 1
        finally:
            browser.close()


def test_playground_lights_sentences_for_an_engine_without_word_timings(tmp_path: Path) -> None:
    """An engine that gives only sentence timings (XTTS; here the fake cloning engine) lights sentences."""
    sync_api = _playwright()
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper",
           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin"}
    with uvicorn_server(env) as base, sync_api.sync_playwright() as p:
        created = httpx.post(base + "/v1/voices", data={"name": "me", "engine": "clone", "consent": "true"},
                             files={"audio": ("me.wav", wav(voice_audio()), "audio/wav")}, timeout=HANG_GUARD_S)
        assert created.status_code == 201, created.text
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(HANG_GUARD_MS)
            page.goto(base + "/")
            sync_api.expect(page.locator("#voice option[value='me']")).to_have_count(1)
            page.locator("#voice").select_option("me")
            page.fill("#text", "One two three. Four five.")
            page.click("#speak")
            sync_api.expect(page.locator("#status")).to_have_class("ok")
            sync_api.expect(page.locator("#status")).to_contain_text("sentence timings")
            assert page.locator("#transcript").get_attribute("data-level") == "sentence"
            cues = _cues(page)
            assert [cue["text"] for cue in cues] == ["One two three.", "Four five."]
            page.evaluate(_duration_js())
            for cue in cues:
                assert _seek(page, (cue["start"] + cue["end"]) / 2) == cue["text"]
            sync_api.expect(page.locator("#captions-download")).to_be_visible()
        finally:
            browser.close()
