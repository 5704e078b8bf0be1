"""Issue 10: the phrase cache answers repeated deterministic requests from disk."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_problem, running_app
from tts_gateway.config import Settings
from tts_gateway.core.phrase_cache import PhraseCache


def stats(client: Any) -> dict[str, Any]:
    return client.get("/v1/cache").json()  # type: ignore[no-any-return]


def test_hit_returns_identical_bytes(client: Any) -> None:
    body = {"text": "Your call is important to us.", "seed": 11}
    first = client.post("/v1/synthesize", json=body)
    second = client.post("/v1/synthesize", json=body)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert first.content == second.content
    assert first.headers["content-type"] == second.headers["content-type"]
    assert stats(client)["hits"] == 1 and stats(client)["entries"] == 1
    text = client.get("/metrics").text
    assert "tts_phrase_cache_hits_total 1.0" in text and "tts_phrase_cache_bytes" in text


@pytest.mark.parametrize(
    "change",
    [{"text": "Your call is important to me."}, {"format": "flac"}, {"sample_rate": 16000}, {"speed": 1.1},
     {"seed": 12}, {"voice": "espeak:en"}, {"language": "en-us", "voice": "espeak:en"}],
)
def test_changing_any_key_part_misses(client: Any, change: dict[str, Any]) -> None:
    body = {"text": "Your call is important to us.", "seed": 11}
    assert client.post("/v1/synthesize", json=body).status_code == 200
    changed = client.post("/v1/synthesize", json={**body, **change})
    assert changed.status_code == 200, changed.text
    assert changed.headers["x-cache"] == "miss"


def test_only_deterministic_requests_are_cached(client: Any) -> None:
    unseeded = {"text": "No seed, sampled noise."}
    assert client.post("/v1/synthesize", json=unseeded).headers["x-cache"] == "miss"
    assert client.post("/v1/synthesize", json=unseeded).headers["x-cache"] == "miss"
    espeak = {"text": "espeak is deterministic.", "voice": "espeak:en"}  # no seed needed
    assert client.post("/v1/synthesize", json=espeak).headers["x-cache"] == "miss"
    assert client.post("/v1/synthesize", json=espeak).headers["x-cache"] == "hit"
    opted_out = {**espeak, "cache": False}
    assert client.post("/v1/synthesize", json=opted_out).headers["x-cache"] == "miss"


def test_streaming_hit_streams_cached_bytes(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed answer ends only once the cache holds it: asking again at once is a hit, even when the
    write is slow (a busy disk)."""
    put = PhraseCache.put

    def slow_put(self: PhraseCache, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        put(self, *args, **kwargs)

    monkeypatch.setattr(PhraseCache, "put", slow_put)
    body = {"text": "Streamed once. Streamed twice.", "seed": 3, "stream": True}
    first = client.post("/v1/synthesize", json=body)
    second = client.post("/v1/synthesize", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.content == second.content and stats(client)["entries"] == 1


def test_a_broken_cache_write_never_costs_a_stream(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: PhraseCache, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the cache")

    body = {"text": "Streamed once. Streamed twice.", "seed": 3, "stream": True}
    monkeypatch.setattr(PhraseCache, "put", broken)
    streamed = client.post("/v1/synthesize", json=body)
    monkeypatch.undo()
    again = client.post("/v1/synthesize", json=body)  # nothing was stored, so this one is synthesized too
    assert streamed.status_code == 200 and (streamed.headers["x-cache"], again.headers["x-cache"]) == ("miss", "miss")
    assert streamed.content == again.content and len(again.content) > 44


def test_corrupt_entry_is_a_miss_and_replaced(client: Any, make_settings: Any) -> None:
    body = {"text": "Corrupt me.", "seed": 5}
    original = client.post("/v1/synthesize", json=body).content
    cache = client.app.state.tts.cache._cache
    key = next(iter(cache))
    value = bytearray(cache[key])
    value[-10] ^= 0xFF
    cache[key] = bytes(value)
    again = client.post("/v1/synthesize", json=body)
    assert again.headers["x-cache"] == "miss"
    assert again.content == original  # re-synthesized, not the corrupt bytes
    assert client.post("/v1/synthesize", json=body).headers["x-cache"] == "hit"


def test_concurrent_identical_requests_never_see_half_entries(client: Any) -> None:
    body = {"text": "Everyone at once.", "seed": 9}
    results: list[Any] = []

    def call() -> None:
        results.append(client.post("/v1/synthesize", json=body))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.status_code == 200 for r in results)
    assert len({r.content for r in results}) == 1
    assert client.post("/v1/synthesize", json=body).content == results[0].content


def test_clear_and_disable(client: Any, make_settings: Any, tmp_path: Path) -> None:
    client.post("/v1/synthesize", json={"text": "Clear me.", "seed": 1})
    assert stats(client)["entries"] == 1
    assert client.delete("/v1/cache").status_code == 204
    assert stats(client)["entries"] == 0
    settings: Settings = make_settings(cache_bytes=0, data_dir=tmp_path / "nocache")
    with running_app(settings) as off:
        body = {"text": "Never cached.", "seed": 1}
        off.post("/v1/synthesize", json=body)
        assert off.post("/v1/synthesize", json=body).headers["x-cache"] == "miss"
        assert stats(off)["enabled"] is False


def test_cache_admin_scope(make_settings: Any) -> None:
    settings = make_settings(api_keys=Settings.from_env({"TTS_GATEWAY_API_KEYS": "a:admin,s:synthesize"}).api_keys)
    with running_app(settings) as client:
        assert_problem(client.delete("/v1/cache", headers={"Authorization": "Bearer s"}), 403, "admin")
        assert client.delete("/v1/cache", headers={"Authorization": "Bearer a"}).status_code == 204


def test_a_damaged_cache_is_moved_aside_at_start(make_settings: Any) -> None:
    settings = make_settings()
    directory = settings.data_dir / "phrase-cache"
    directory.mkdir(parents=True)
    (directory / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    with running_app(settings) as client:
        response = client.post("/v1/synthesize", json={"text": "Still here.", "seed": 1})
        assert response.status_code == 200, response.text
        assert client.post("/v1/synthesize", json={"text": "Still here.", "seed": 1}).headers["x-cache"] == "hit"
    aside = [p for p in settings.data_dir.iterdir() if p.name.startswith("phrase-cache.damaged-")]
    assert len(aside) == 1 and (aside[0] / "cache.db").read_bytes().startswith(b"this is not")


def test_a_failing_cache_write_never_costs_the_result(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import diskcache

    def full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(diskcache.Cache, "set", full)
    response = client.post("/v1/synthesize", json={"text": "Disk is full.", "seed": 9})
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    assert response.headers["x-cache"] == "miss"
