"""The playground page at `/`, driven in headless Debian Chromium against a real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import HANG_GUARD_S, uvicorn_server, voice_audio, wav

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# Set to a path to keep a screenshot of the page after a successful Speak (for eyeballing the layout).
SCREENSHOT = os.environ.get("TTS_GATEWAY_PLAYGROUND_SCREENSHOT")
HANG_GUARD_MS = int(HANG_GUARD_S * 1000)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _duration_js() -> str:
    """Resolve with the <audio> element's duration once its metadata has loaded."""
    return """() => new Promise((resolve, reject) => {
        const player = document.getElementById("player");
        const done = () => resolve(player.duration);
        if (player.readyState >= 1) return done();
        player.addEventListener("loadedmetadata", done, {once: true});
        player.addEventListener("error", () => reject(new Error("audio error " + (player.error && player.error.code))),
                                {once: true});
        setTimeout(() => reject(new Error("no loadedmetadata within 120 s")), 120000);
    })"""


def test_playground_speaks_and_reports_errors(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (playwright cannot download its own browsers here)")
    expect = sync_api.expect
    # Hang guards, not speed claims: Chromium on a loaded 2-core box can take seconds per step, and expect()'s
    # own default is only 5 s (page.set_default_timeout does not apply to it).
    expect.set_options(timeout=HANG_GUARD_MS)

    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,espeak"}
    with uvicorn_server(env) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(HANG_GUARD_MS)
            page.goto(base + "/")

            # The lists are filled from /v1/voices and /v1/languages.
            voice = page.locator("#voice")
            expect(voice.locator("option[value='piper:joe']")).to_have_count(1)
            espeak_voices = voice.locator("option[value^='espeak:']")
            expect(espeak_voices.first).to_be_attached()
            assert espeak_voices.count() > 1
            expect(page.locator("#language option").first).to_be_attached()
            for control in ("text", "voice", "language", "format", "speed", "apikey"):
                expect(page.locator(f"label[for='{control}']")).to_have_count(1)

            # Choosing a voice preselects its language and offers only its engine's languages.
            voice.select_option("piper:joe")
            expect(page.locator("#language")).to_have_value("en")
            piper_codes = page.locator("#language option").evaluate_all("els => els.map(e => e.value)")
            assert piper_codes == ["en"], piper_codes

            # Speak: the audio lands in the <audio> element and the status shows the response headers.
            page.fill("#text", "Hello from the playground. This sentence should last for more than a second.")
            page.click("#speak")
            status = page.locator("#status")
            expect(status).to_have_class("ok")
            expect(status).to_contain_text("piper")
            expect(status).to_contain_text("piper:joe")
            expect(status).to_contain_text("seed")
            expect(status).not_to_have_class("error")
            src = page.locator("#player").get_attribute("src") or ""
            assert src.startswith("blob:"), src
            duration = page.evaluate(_duration_js())
            assert duration > 0.5, duration
            if SCREENSHOT:
                page.screenshot(path=SCREENSHOT, full_page=True)

            # An error: empty text is a 422 problem, shown as "title: detail" with the error class.
            page.fill("#text", "")
            page.click("#speak")
            expect(status).to_have_class("error")
            expect(status).to_contain_text("Invalid field: text: must not be empty")
            assert page.locator("#player").get_attribute("src") == src  # the last good audio stays
        finally:
            browser.close()


def test_playground_finds_voices_shows_engines_downloads_and_registers(tmp_path: Path) -> None:
    """Search and language filter, engine status, download, and registration from a file and from the
    microphone (Chromium's fake capture device), consent first — against a real server."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (playwright cannot download its own browsers here)")
    import re

    expect = sync_api.expect
    expect.set_options(timeout=HANG_GUARD_MS)
    clip = tmp_path / "me.wav"
    clip.write_bytes(wav(voice_audio(rate=22050), 22050))
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path / "data"), "TTS_GATEWAY_ENGINES": "piper,espeak",
           "TTS_GATEWAY_PLUGINS": "tests.fake_cloning_plugin"}
    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required"]
    with uvicorn_server(env) as base, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            context = browser.new_context(accept_downloads=True)
            context.grant_permissions(["microphone"], origin=base)
            page = context.new_page()
            page.set_default_timeout(HANG_GUARD_MS)
            page.goto(base + "/")
            voice = page.locator("#voice")
            expect(voice.locator("option[value='piper:joe']")).to_have_count(1)
            total = voice.locator("option").count()
            assert total > 50  # every espeak-ng language is a voice

            # Search narrows the list; the count says how far.
            page.fill("#voice-filter", "joe")
            expect(voice.locator("option")).to_have_count(1)
            expect(page.locator("#voice-count")).to_have_text(f"(1 of {total})")
            page.fill("#voice-filter", "")
            expect(voice.locator("option")).to_have_count(total)
            # The language filter keeps only voices that speak it.
            page.select_option("#voice-lang", "de")
            names = voice.locator("option").evaluate_all("els => els.map(e => e.value)")
            assert names and "espeak:de" in names and "piper:joe" not in names, names
            assert all(n.startswith("espeak:de") for n in names), names
            page.select_option("#voice-lang", "")

            # Engine status, from /v1/engines.
            engines = page.locator("#engines")
            expect(engines.locator("li[data-engine='piper']")).to_contain_text("available")
            expect(engines.locator("li[data-engine='espeak']")).to_contain_text("available")
            expect(engines.locator("li[data-engine='clone']")).to_contain_text("clones voices")

            # Speak, then download what was heard.
            voice.select_option("piper:joe")
            page.fill("#text", "Download me.")
            page.click("#speak")
            expect(page.locator("#status")).to_have_class("ok")
            expect(page.locator("#download")).to_be_visible()
            with page.expect_download() as caught:
                page.click("#download")
            saved = Path(caught.value.path())
            assert caught.value.suggested_filename == "speech.wav"
            assert saved.read_bytes()[:4] == b"RIFF" and saved.stat().st_size > 10_000

            # Register from an uploaded clip: refused without consent, accepted with it, then selected.
            expect(page.locator("#reg-engine option[value='clone']")).to_have_count(1)
            page.fill("#reg-name", "from-file")
            page.set_input_files("#reg-file", str(clip))
            page.click("#reg-submit")
            reg_status = page.locator("#reg-status")
            expect(reg_status).to_have_class(re.compile("error"))
            expect(reg_status).to_contain_text("consent")
            page.check("#reg-consent")
            page.click("#reg-submit")
            expect(reg_status).to_have_class(re.compile("ok"))
            expect(reg_status).to_contain_text("Registered from-file")
            expect(voice).to_have_value("from-file")
            page.fill("#text", "Now in my own voice.")
            page.click("#speak")
            expect(page.locator("#status")).to_contain_text("voice from-file")

            # Register from the microphone: record until the page has counted 2.5 s, stop, register.
            page.click("#rec-start")
            expect(page.locator("#rec-status")).to_have_text(re.compile(r"Recording… ([3-9]|2\.[5-9]|\d\d)"))
            page.click("#rec-stop")
            expect(page.locator("#rec-status")).to_contain_text("Recorded")
            page.fill("#reg-name", "from-mic")
            page.click("#reg-submit")
            expect(reg_status).to_contain_text("Registered from-mic")
            expect(voice).to_have_value("from-mic")
            described = page.evaluate("fetch('/v1/voices/from-mic').then(r => r.json())")
            assert described["consent"] is True and described["duration"] >= 2.0, described
        finally:
            browser.close()
