"""Every plugin hook and every route has a test (datasette's meta-test idea).

The hooks come from the plugin manager itself (``dir(pm.hook)``), not from reading source: a new
hookspec fails here until a test plugin implements it and a ``test_hook_<name>`` test exercises it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import fake_cloning_plugin
from tests.conftest import ROOT
from tests.fake_engine import FakeEngine, FakePlugin
from tts_gateway.config import Settings
from tts_gateway.engines.base import EngineContext
from tts_gateway.engines.manager import EngineManager

TESTS = Path(__file__).parent


def _sources() -> str:
    return "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != "test_meta.py")


def _hook_names(manager: EngineManager) -> list[str]:
    return [name for name in dir(manager.pm.hook) if not name.startswith("_")]


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """The plugins the test suite registers: FakePlugin, the cloning plugin module and hello_engine."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "hello_engine"))
    import hello_engine

    return FakePlugin(FakeEngine()), fake_cloning_plugin, hello_engine


def test_every_hook_has_a_test_plugin_and_a_test(make_settings: Callable[..., Settings],
                                                 test_plugins: tuple[Any, ...]) -> None:
    manager = EngineManager(make_settings(engines=()), extra_plugins=test_plugins, load_entry_points=False)
    hooks = _hook_names(manager)
    assert hooks, "the plugin manager has no hooks"
    tests_here = [name for name in dir(sys.modules[__name__]) if name.startswith("test_hook_")]
    missing = []
    for name in hooks:
        caller = getattr(manager.pm.hook, name)
        implemented_by = {id(impl.plugin) for impl in caller.get_hookimpls()}
        if not any(id(plugin) in implemented_by for plugin in test_plugins):
            missing.append(f"{name}: no test plugin implements it")
        if f"test_hook_{name}" not in tests_here:
            missing.append(f"{name}: no test_hook_{name} test")
    assert missing == []


def test_hook_register_engines(make_settings: Callable[..., Settings], test_plugins: tuple[Any, ...]) -> None:
    """Each test plugin's ``register_engines`` is called with ``register`` and an `EngineContext`."""
    seen: list[EngineContext] = []

    class Recorder:
        from tts_gateway.engines.hookspecs import hookimpl

        @hookimpl
        def register_engines(self, register: Callable[[Any], None], context: EngineContext) -> None:
            seen.append(context)

    settings = make_settings(engines=())
    manager = EngineManager(settings, extra_plugins=(*test_plugins, Recorder()), load_entry_points=False)
    assert sorted(manager.names) == ["clone", "fake", "hello"]
    assert len(seen) == 1 and isinstance(seen[0], EngineContext)
    assert str(seen[0].data_dir).startswith(str(settings.data_dir))


def _calls(method: str, path: str) -> str:
    """A regex for a test calling ``method path``: ``client.post("/v1/voices"``, ``httpx.get(base + "/ready"``,
    a ``("POST", "/v1/synthesize"`` table row, or a browser's ``page.goto(base + "/")`` for GET."""
    target = re.escape(re.sub(r"\{[^}]+\}", "X", path)).replace("X", r"[^\"' ]+")
    quoted = rf"f?[\"'](?:[^\"']*){target}[\"'?]"
    prefix = r"(?:[\w.]+\s*\+\s*)?"
    calls = [rf"\.{method.lower()}\(\s*{prefix}{quoted}", rf"[\"']{method}[\"']\s*,\s*{quoted}"]
    if method == "GET":
        calls.append(rf"\.goto\(\s*{prefix}{quoted}")
    return "|".join(calls)


def test_every_route_has_a_test(client: Any) -> None:
    """Every method of every route (but the docs pages, HEAD and OPTIONS) is called by some test."""
    sources = _sources()
    missing = []
    for route in client.app.routes:
        if route.path.startswith("/docs"):
            continue
        for method in sorted(set(route.methods) - {"HEAD", "OPTIONS"}):
            if not re.search(_calls(method, route.path), sources):
                missing.append(f"{method} {route.path}")
    assert missing == [], f"routes without a test: {missing}"


def test_every_declared_marker_marks_a_test() -> None:
    """Each marker pyproject.toml declares marks some test, so selecting by it (``-m "not slow"``) does something."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    sources = _sources()
    unused = [line.split(":")[0] for line in declared if not re.search(rf"\bmark\.{line.split(':')[0]}\b", sources)]
    assert unused == [], f"markers declared but never used: {unused}"
