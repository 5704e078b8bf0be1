"""Every hookspec and every route has a test (datasette's meta-test idea)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tts_gateway.engines import hookspecs

TESTS = Path(__file__).parent


def _sources() -> str:
    return "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != "test_meta.py")


def test_every_hookspec_is_exercised() -> None:
    sources = _sources()
    specs = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "tts_gateway_spec")]
    assert specs == ["register_engines"]
    for name in specs:
        # A test registers a plugin implementing it (FakePlugin / hello_engine / fake_cloning_plugin).
        assert re.search(rf"def {name}\(", (TESTS / "fake_engine.py").read_text())
        assert "FakePlugin(" in sources and "hello_engine" in sources


def test_every_route_has_a_test(client: Any) -> None:
    sources = _sources()
    missing = []
    for route in client.app.routes:
        path = route.path
        if path.startswith("/docs"):
            continue
        pattern = re.escape(re.sub(r"\{[^}]+\}", "X", path)).replace("X", r"[^\"' ]+")
        if not re.search(rf"[\"'](?:[^\"']*){pattern}[\"'?]", sources):
            missing.append(path)
    assert missing == [], f"routes without a test: {missing}"
