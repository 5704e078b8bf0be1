"""Plugin hooks. Built-in engines are plugins like any other (see ``manager.DEFAULT_PLUGINS``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tts_gateway.engines.base import EngineContext, SpeechEngine

hookspec = pluggy.HookspecMarker("tts_gateway")
hookimpl = pluggy.HookimplMarker("tts_gateway")


@hookspec
def register_engines(register: Callable[[SpeechEngine], None], context: EngineContext) -> None:
    """Register engines by calling ``register(engine)`` once per engine.

    Args:
        register: Adds one engine; its ``name`` must be unique across plugins.
        context: Data dir, device, threads and engine options (`EngineContext`). Optional to accept.
    """
