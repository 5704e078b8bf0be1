"""The HTTP API, one Litestar `Controller` per area; services come in by dependency injection."""

from __future__ import annotations

from litestar import Controller

from tts_gateway.gateway.controllers.cache import CacheController
from tts_gateway.gateway.controllers.captioned import CaptionedSpeechController
from tts_gateway.gateway.controllers.engines import EnginesController
from tts_gateway.gateway.controllers.openai import OpenAIController
from tts_gateway.gateway.controllers.operations import OperationsController
from tts_gateway.gateway.controllers.synthesis import SynthesisController
from tts_gateway.gateway.controllers.text import TextController
from tts_gateway.gateway.controllers.voices import VoicesController

CONTROLLERS: list[type[Controller]] = [
    SynthesisController, OpenAIController, VoicesController, EnginesController, CacheController,
    OperationsController, TextController, CaptionedSpeechController,
]

__all__ = ["CONTROLLERS", "CacheController", "CaptionedSpeechController", "EnginesController", "OpenAIController",
           "OperationsController", "SynthesisController", "TextController", "VoicesController"]
