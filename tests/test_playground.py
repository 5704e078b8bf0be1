"""The playground page at `/`, driven in headless Debian Chromium against a real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import HANG_GUARD_S, uvicorn_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
# Set to a path to keep a screenshot of the page after a successful Speak (for eyeballing the layout).
SCREENSHOT = os.environ.get("TTS_GATEWAY_PLAYGROUND_SCREENSHOT")
HANG_GUARD_MS = int(HANG_GUARD_S * 1000)


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


@pytest.mark.browser
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
