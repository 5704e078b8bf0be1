"""`create_app(settings, engine_manager)`: the Litestar application."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from litestar import Litestar, MediaType, Request, Response, delete, get, post
from litestar.enums import RequestEncodingType
from litestar.exceptions import ClientException, SerializationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Body
from litestar.response import File, Stream

from tts_gateway import __version__
from tts_gateway.config import Settings
from tts_gateway.core.compose import Core, build_core
from tts_gateway.core.dispatch import Dispatcher
from tts_gateway.core.service import Plan, SynthesisRequest
from tts_gateway.engines.base import CloningEngine
from tts_gateway.engines.manager import EngineManager
from tts_gateway.errors import InvalidField, TTSGatewayError, UnsupportedMedia
from tts_gateway.gateway.auth import scope_guard
from tts_gateway.gateway.problems import EXCEPTION_HANDLERS, problem, status_of
from tts_gateway.gateway.schemas import LegacyForm, SpeechBody, SynthesizeBody, VoiceForm
from tts_gateway.languages import language_name
from tts_gateway.voices.catalog import ResolvedVoice

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
LEGACY_RATE = 16000
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


async def respond(dispatcher: Dispatcher, plan: Plan) -> Response[Any]:
    """Run ``plan`` and answer with audio; counts the request by engine and status."""
    metrics = dispatcher.core.metrics
    try:
        outcome = await dispatcher.run(plan)
    except TTSGatewayError as exc:
        metrics.requests.labels(plan.engine_name, str(status_of(exc))).inc()
        raise
    except Exception:
        metrics.requests.labels(plan.engine_name, "500").inc()
        raise
    metrics.requests.labels(plan.engine_name, "200").inc()
    if outcome.audio is not None and not plan.streams:
        return Response(outcome.audio, media_type=outcome.media_type, headers=outcome.headers)
    return Stream(outcome.chunks(), media_type=outcome.media_type, headers=outcome.headers)


async def _chunked(data: bytes, size: int = 32768) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class _Edge:
    """What a handler reaches: the dispatcher and, through it, the core (transitional accessors)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.core = dispatcher.core
        self.settings = dispatcher.core.settings
        self.engines = dispatcher.core.engines
        self.voices = dispatcher.core.voices
        self.metrics = dispatcher.core.metrics
        self.service = dispatcher.core.service
        assert dispatcher.core.cache is not None  # the app always opens the phrase cache
        self.cache = dispatcher.core.cache
        self.readiness = dispatcher.readiness

    async def run_synthesis(self, plan: Plan, request: Request[Any, Any, Any]) -> Response[Any]:
        return await respond(self.dispatcher, plan)

    async def blocking(self, fn: Any) -> Any:
        return await self.dispatcher.blocking(fn)


def _gw(request: Request[Any, Any, Any]) -> _Edge:
    return _Edge(request.app.state.tts)


def _mime(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


_NON_FINITE = re.compile(rb'"([^"\\]{1,64})"\s*:\s*-?(?:NaN|Infinity)\b')


async def require_json(request: Request[Any, Any, Any]) -> None:
    """before_request hook: runs before the body is parsed, so the wrong type is a 415."""
    mime = _mime(request)
    if mime != "application/json" and not mime.endswith("+json"):
        raise UnsupportedMedia(f"send the body as application/json, not {mime or 'no content type'}")
    # Python's json module writes NaN/Infinity, which JSON lacks: a bad value (422), not bad JSON.
    non_finite = _NON_FINITE.search(await request.body())
    if non_finite:
        raise InvalidField(non_finite.group(1).decode(errors="replace"), "must be a finite number")


async def require_multipart(request: Request[Any, Any, Any]) -> None:
    mime = _mime(request)
    if mime != "multipart/form-data":
        raise UnsupportedMedia(f"send the body as multipart/form-data, not {mime or 'no content type'}")
    try:
        await request.form()  # parsed here (and reused): Litestar lets charset errors escape as 500s
    except (UnicodeDecodeError, LookupError) as exc:
        raise ClientException(f"a form field is not valid text in its charset: {exc}") from None


class SafeJSONRequest(Request[Any, Any, Any]):
    """Turns JSON decode failures Litestar does not catch into 400s instead of 500s."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except UnicodeDecodeError as exc:
            raise SerializationException(f"JSON is malformed: not UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise SerializationException("JSON is malformed: nested too deeply") from None


# -- synthesis ---------------------------------------------------------------------------------
@post("/v1/synthesize", status_code=200, opt={"scope": "synthesize"}, tags=["synthesis"], before_request=require_json,
      summary="Synthesize speech")
async def synthesize(request: Request[Any, Any, Any], data: SynthesizeBody) -> Response[Any]:
    """Text → audio with a built-in voice (`engine:voice`) or a registered preset."""
    gw = _gw(request)
    synthesis = SynthesisRequest(
        text=data.text, voice=data.voice, language=data.language, format=data.format,
        sample_rate=data.sample_rate, speed=data.speed, seed=data.seed, stream=data.stream, cache=data.cache,
    )
    gw.service.check_text(synthesis.text)
    plan = await asyncio.to_thread(gw.service.plan, synthesis)
    return await gw.run_synthesis(plan, request)


@post("/v1/audio/speech", status_code=200, opt={"scope": "synthesize"}, tags=["openai"], before_request=require_json,
      summary="OpenAI-compatible speech")
async def openai_speech(request: Request[Any, Any, Any], data: SpeechBody) -> Response[Any]:
    """Works with the `openai` SDK: `client.audio.speech.create(model=..., voice=..., input=...)`."""
    gw = _gw(request)
    if data.response_format == "aac":
        raise InvalidField("response_format", "aac is not supported here; use mp3, opus, flac, wav or pcm")
    voice = _openai_voice(gw, data.model, data.voice)
    fmt = data.response_format
    synthesis = SynthesisRequest(
        text=data.input, voice=voice, format=fmt, speed=data.speed, stream=True,
        sample_rate=24000 if fmt == "pcm" else None,  # OpenAI's pcm is 24 kHz s16le
    )
    gw.service.check_text(synthesis.text)
    plan = await asyncio.to_thread(gw.service.plan, synthesis)
    return await gw.run_synthesis(plan, request)


def _openai_voice(gw: _Edge, model: str, voice: str | None) -> str:
    settings = gw.settings
    default_engine = settings.default_voice.split(":")[0] if ":" in settings.default_voice else None
    if model in OPENAI_MODELS:
        engine_name = None
    elif model in gw.engines.names:
        engine_name = model
    else:
        raise InvalidField("model", f"{model!r} is not {', '.join(OPENAI_MODELS)} or an engine "
                                    f"({', '.join(gw.engines.names)})")
    if voice is None:
        voice = "alloy"
    mapped = settings.openai_voice(voice) if ":" not in voice and not gw.voices.registry.exists(voice) else None
    if mapped is not None:
        voice = mapped
        if engine_name and (":" not in voice or voice.split(":")[0] != engine_name):
            engine = gw.engines.get(engine_name)
            builtins = engine.voices()
            if not builtins:
                raise InvalidField("voice", f"engine {engine_name!r} has no built-in voice for {voice!r}")
            english = [v for v in builtins if v.language.startswith("en")]
            voice = f"{engine_name}:{(english or builtins)[0].id}"
        return voice
    if engine_name:
        resolved_engine = voice.split(":")[0] if ":" in voice else _preset_engine(gw, voice)
        if resolved_engine is not None and resolved_engine != engine_name:
            raise InvalidField("voice", f"voice {voice!r} belongs to engine {resolved_engine!r}, not {engine_name!r}")
    _ = default_engine
    return voice


def _preset_engine(gw: _Edge, name: str) -> str | None:
    return gw.voices.preset_engine(name)


@post("/synthesize", status_code=200, opt={"scope": "synthesize"}, tags=["legacy"], before_request=require_multipart,
      summary="The old service's call: text + speaker_audio → 16 kHz WAV via XTTS")
async def legacy_synthesize(
    request: Request[Any, Any, Any],
    data: Annotated[LegacyForm, Body(media_type=RequestEncodingType.MULTI_PART)],
) -> Response[Any]:
    gw = _gw(request)
    if not hasattr(data.speaker_audio, "read"):
        raise InvalidField("speaker_audio", "must be an uploaded audio file")
    gw.service.check_text(data.text)
    audio = await data.speaker_audio.read()
    label = data.speaker_audio.filename or "speaker_audio"
    voice: ResolvedVoice = await gw.blocking(lambda: gw.voices.condition_upload([(label, audio)], "xtts"))
    synthesis = SynthesisRequest(text=data.text, language=data.language or "en", format="wav",
                                 sample_rate=LEGACY_RATE)
    plan = await asyncio.to_thread(gw.service.plan, synthesis, voice)
    return await gw.run_synthesis(plan, request)


# -- voices ------------------------------------------------------------------------------------
@get("/v1/voices", opt={"scope": "any"}, tags=["voices"], summary="List built-in voices and presets")
async def list_voices(request: Request[Any, Any, Any]) -> dict[str, Any]:
    voices = await asyncio.to_thread(_gw(request).voices.all)
    return {"voices": voices}


@get("/v1/voices/{name:str}", opt={"scope": "any"}, tags=["voices"], summary="One voice")
async def get_voice(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    return await asyncio.to_thread(_gw(request).voices.describe, name)


@delete("/v1/voices/{name:str}", status_code=204, opt={"scope": "voices"}, tags=["voices"],
        summary="Delete a preset")
async def delete_voice(request: Request[Any, Any, Any], name: str) -> None:
    await asyncio.to_thread(_gw(request).voices.delete, name)


@post("/v1/voices", status_code=201, opt={"scope": "voices"}, tags=["voices"], before_request=require_multipart,
      summary="Register a preset: latents are computed once and stored")
async def create_voice(
    request: Request[Any, Any, Any],
    data: Annotated[VoiceForm, Body(media_type=RequestEncodingType.MULTI_PART)],
) -> Response[Any]:
    gw = _gw(request)
    uploads = data.audio if isinstance(data.audio, list) else [data.audio]
    files = []
    for index, upload in enumerate(uploads):
        if not hasattr(upload, "read"):
            raise InvalidField("audio", "must be one or more uploaded audio files")
        files.append((upload.filename or f"audio[{index}]", await upload.read()))
    if not files:
        raise InvalidField("audio", "send at least one reference audio file")
    consent = str(data.consent).strip().lower() in {"1", "true", "yes", "on"}
    voice = await gw.blocking(lambda: gw.voices.register(
        data.name, files, engine_name=data.engine or "xtts", language=data.language or None,
        description=data.description or "", consent=consent,
    ))
    return Response(voice, status_code=201, headers={"Location": f"/v1/voices/{voice['name']}"})


# -- engines & languages -------------------------------------------------------------------------
def engine_json(gw: _Edge, name: str) -> dict[str, Any]:
    engine = gw.engines.get(name)
    available, reason = engine.availability()
    try:
        model: Any = engine.model
    except Exception:  # an unavailable engine may not be able to describe its model
        model = None
    return {
        "name": name,
        "available": available,
        "reason": reason,
        "loaded": engine.loaded,
        "languages": list(engine.languages) if available else [],
        "capabilities": {"cloning": isinstance(engine, CloningEngine),
                         "streaming": engine.capabilities.streaming},
        "sample_rate": engine.sample_rate,
        "model": {"id": model.id, "sha256": model.sha256, "licence": model.licence} if model else None,
        "voices": [f"{name}:{v.id}" for v in engine.voices()] if available else [],
    }


@get("/v1/engines", opt={"scope": "any"}, tags=["engines"], summary="List engines")
async def list_engines(request: Request[Any, Any, Any]) -> dict[str, Any]:
    gw = _gw(request)
    engines = await asyncio.to_thread(lambda: [engine_json(gw, n) for n in gw.engines.names])
    return {"engines": engines}


def _known_engine(gw: _Edge, name: str) -> None:
    gw.engines.get(name)  # UnknownEngine (404) when there is none


@get("/v1/engines/{name:str}", opt={"scope": "any"}, tags=["engines"], summary="One engine")
async def get_engine(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    gw = _gw(request)
    _known_engine(gw, name)
    return await asyncio.to_thread(engine_json, gw, name)


@post("/v1/engines/{name:str}/load", status_code=200, opt={"scope": "admin"}, tags=["engines"],
      summary="Load an engine's model now")
async def load_engine(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    gw = _gw(request)
    _known_engine(gw, name)
    await gw.blocking(lambda: gw.engines.ensure_loaded(name))
    gw.metrics.engine_loaded.labels(name).set(1)
    return engine_json(gw, name)


@post("/v1/engines/{name:str}/unload", status_code=200, opt={"scope": "admin"}, tags=["engines"],
      summary="Unload an engine's model and free its memory")
async def unload_engine(request: Request[Any, Any, Any], name: str) -> Response[Any]:
    gw = _gw(request)
    _known_engine(gw, name)
    done = await asyncio.to_thread(gw.engines.unload, name)
    if not done:
        return problem(409, f"engine {name!r} is busy synthesizing; try again when it is idle",
                       kind="busy", headers={"Retry-After": "5"})
    gw.metrics.engine_loaded.labels(name).set(0)
    return Response(engine_json(gw, name))


@get("/v1/languages", opt={"scope": "any"}, tags=["engines"], summary="Languages and the engines that speak them")
async def list_languages(request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
    gw = _gw(request)

    def collect() -> list[dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for name in gw.engines.names:
            engine = gw.engines.get(name)
            if not engine.availability()[0]:
                continue
            names = getattr(engine, "language_names", None) or {}
            for code in engine.languages:
                entry = table.setdefault(code, {"code": code, "name": names.get(code) or language_name(code),
                                                "engines": []})
                entry["engines"].append(name)
        return sorted(table.values(), key=lambda e: e["code"])

    return await asyncio.to_thread(collect)


# -- phrase cache ------------------------------------------------------------------------------
@get("/v1/cache", opt={"scope": "admin"}, tags=["cache"], summary="Phrase cache size and hit ratio")
async def cache_stats(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(_gw(request).cache.stats)


@delete("/v1/cache", status_code=204, opt={"scope": "admin"}, tags=["cache"], summary="Empty the phrase cache")
async def cache_clear(request: Request[Any, Any, Any]) -> None:
    await asyncio.to_thread(_gw(request).cache.clear)


# -- operations --------------------------------------------------------------------------------
@get("/health", tags=["operations"], summary="Liveness")
async def health() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@get("/ready", tags=["operations"], summary="200 once the default engine is loaded and a canary passed")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    readiness = _gw(request).readiness
    if readiness.ready:
        return Response({"status": "ready", "detail": readiness.detail})
    return problem(503, readiness.detail, kind="not-ready", title="Not ready", headers={"Retry-After": "2"})


@get("/metrics", tags=["operations"], summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(_gw(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/", include_in_schema=False)
async def playground() -> File:
    return File(STATIC / "index.html", filename="index.html", content_disposition_type="inline",
                media_type=MediaType.HTML)


# -- assembly ----------------------------------------------------------------------------------
def create_app(settings: Settings, engine_manager: EngineManager | None = None, *,
               core: Core | None = None) -> Litestar:
    """Build the app from settings (and, for tests, a ready engine manager or core).

    Resources are created here and released at shutdown.
    """
    from tts_gateway.ray import make_backend  # None for TTS_GATEWAY_BACKEND=local

    core = core or build_core(settings, engines=engine_manager)
    backend = make_backend(settings, core.registry)
    dispatcher = Dispatcher(core, runner=backend)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        dispatcher.start()
        try:
            yield
        finally:
            await dispatcher.close()

    app = Litestar(
        route_handlers=[
            synthesize, openai_speech, legacy_synthesize,
            list_voices, get_voice, create_voice, delete_voice,
            list_engines, get_engine, load_engine, unload_engine, list_languages, cache_stats, cache_clear,
            health, ready, metrics_endpoint, playground,
        ],
        guards=[scope_guard],
        request_class=SafeJSONRequest,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        request_max_body_size=settings.max_upload_bytes,
        openapi_config=OpenAPIConfig(
            title="tts-gateway", version=__version__, path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
            description="Multi-engine text-to-speech gateway: XTTS v2, Piper, espeak-ng.",
        ),
        debug=False,
    )
    app.state.tts = dispatcher
    app.state.backend = backend  # started by `tts-gateway serve` on the main thread, before uvicorn
    app.state.settings = settings
    return app


