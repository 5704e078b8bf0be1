"""Plugin hooks. Built-in engines are plugins like any other (see ``manager.DEFAULT_PLUGINS``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import pluggy

from tts_gateway.engines.base import EngineContext, SpeechEngine

hookspec = pluggy.HookspecMarker("tts_gateway")
hookimpl = pluggy.HookimplMarker("tts_gateway")

# What ``register_engines`` gets to add one engine: ``def register_engines(register: Register) -> None``.
Register: TypeAlias = Callable[[SpeechEngine], None]


@hookspec
def register_engines(register: Register, context: EngineContext) -> None:
    """Register engines by calling ``register(engine)`` once per engine.

    Args:
        register: Adds one engine; its ``name`` must be unique across plugins, and it must have every
            member of `SpeechEngine` (registration names the missing ones).
        context: Data dir, device, threads and engine options (`EngineContext`). Optional to accept.
    """
