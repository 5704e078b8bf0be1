"""The Wyoming edge: Home Assistant speaks through the gateway.

`tts-gateway serve` runs it beside the HTTP API when ``TTS_GATEWAY_WYOMING_URI`` is set (same
process, same event loop, same `Dispatcher`). ``describe`` lists every usable voice (built-ins and
presets, read fresh each time); ``synthesize`` and the streaming form (``synthesize-start`` /
``-chunk`` / ``-stop``) answer with 16-bit mono PCM at the engine's rate, sentence by sentence.
There is no authentication on Wyoming.

``server`` (listening, draining, the ASGI lifespan) → ``handler`` (one connection; its server seen
as a `Host`) → ``requests`` (parsing, the voice), ``text_stream`` (a stream's text in sentences),
``audio_out`` (PCM as events) → ``info`` (the ``describe`` answer), ``metrics``. Imports go that
way only (an import-linter contract).
"""

from tts_gateway.wyoming.handler import GatewayHandler
from tts_gateway.wyoming.info import build_info
from tts_gateway.wyoming.server import WyomingServer, alongside, is_loopback

__all__ = ["GatewayHandler", "WyomingServer", "alongside", "build_info", "is_loopback"]
