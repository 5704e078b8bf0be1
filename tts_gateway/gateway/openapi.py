"""The OpenAPI document and the interactive docs at ``/docs``.

* Audio routes declare the media types the server really sends (`AUDIO_MEDIA_TYPES`, from
  `tts_gateway.audio`) and the synthesis headers, through an `Operation` subclass (Litestar's
  `ResponseSpec` holds one media type per status, audio routes answer with five).
* Every route lists its errors as ``application/problem+json`` `ProblemDetails`
  (`problems.problem_responses`); Litestar's generic ``400 application/json`` entry is dropped where
  a route cannot answer 400.
* Request bodies document their rules: `StrictStructSchemaPlugin` adds ``additionalProperties: false``
  for Structs that forbid unknown fields, `FormSchemaPlugin` the rules of multipart form fields. Both
  extend Litestar's own schema plugins (``litestar._openapi...``: private, pinned by ``litestar<3``).
* ``/docs`` is Swagger UI served from the ``swagger-ui-py`` package's copy of the Swagger UI dist
  files under ``/docs/assets/``: the page loads nothing from another host.
* The document is at ``/docs/openapi.json`` and, the same bytes, at ``/openapi.json`` (FastAPI's path,
  which clients and tools probe).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router, get
from litestar._openapi.plugin import OpenAPIPlugin
from litestar._openapi.schema_generation.plugins.dataclass import DataclassSchemaPlugin
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Reference, Schema, Tag
from litestar.openapi.spec.header import OpenAPIHeader
from litestar.static_files import create_static_files_router
from litestar.typing import FieldDefinition

from tts_gateway import __version__
from tts_gateway.audio import FORMATS, media_type
from tts_gateway.gateway.problems import PROBLEM_JSON, problem, problem_responses

log = logging.getLogger(__name__)

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"
SWAGGER_UI_PACKAGE = "swagger_ui"  # PyPI: swagger-ui-py (ships the Swagger UI 5 dist files)
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css", "favicon-32x32.png")

# -- audio responses ---------------------------------------------------------------------------------------
# What each output format is sent as (parameters such as ``;rate=`` left out: media types match on type/subtype).
AUDIO_MEDIA_TYPES: dict[str, str] = {
    name: media_type(fmt, 16000).split(";")[0] for name, fmt in FORMATS.items()
}
AUDIO_FORMAT_NOTES: dict[str, str] = {
    "wav": "16-bit PCM WAV; when streamed, the header is open-ended",
    "pcm": "raw 16-bit little-endian mono; the rate is in `Content-Type: audio/L16;rate=…` and `X-Sample-Rate`",
    "flac": "FLAC, always sent whole",
    "mp3": "MPEG layer III, always sent whole",
    "opus": "Ogg Opus (`audio/ogg;codecs=opus`)",
}


def _header(description: str, *, required: bool, pattern: str | None = None) -> OpenAPIHeader:
    return OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING, pattern=pattern), description=description,
                         required=required)


SYNTHESIS_HEADERS: dict[str, OpenAPIHeader] = {
    "X-Engine": _header("The engine that spoke", required=True),
    "X-Voice": _header("The voice used (`engine:voice`, a preset name, or `upload:…`)", required=True),
    "X-Seed": _header("The seed used; the same seed and voice give the same bytes", required=True,
                      pattern=r"^[0-9]+$"),
    "X-Sample-Rate": _header("Sample rate of the audio in Hz", required=True, pattern=r"^[0-9]+$"),
    "X-Cache": _header("`hit` when the phrase cache answered, else `miss`", required=True, pattern="^(hit|miss)$"),
    "X-Model-Sha256": _header("sha256 of the engine's model files, when the engine reports one", required=False),
    "X-Voice-Sha256": _header("sha256 of the stored latents (presets and uploaded clips)", required=False),
}
INSTRUCTIONS_HEADER = "X-Instructions-Ignored"
INSTRUCTIONS_HEADERS = {INSTRUCTIONS_HEADER: _header(
    "Present when the request had `instructions`: no engine here supports them, so they were not applied",
    required=False)}
LOCATION_HEADERS = {"Location": _header("Where the new voice is: `/v1/voices/{name}`", required=True,
                                        pattern="^/v1/voices/")}
RETRY_AFTER = _header("Seconds to wait before retrying", required=True, pattern=r"^[0-9]+$")


def _audio_content(formats: Iterable[str]) -> dict[str, OpenAPIMediaType]:
    content: dict[str, OpenAPIMediaType] = {}
    for name in formats:
        mime = AUDIO_MEDIA_TYPES[name]
        content[mime] = OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.STRING, content_media_type=mime,
            description=f"`{name}`: {AUDIO_FORMAT_NOTES[name]}",
        ))
    return content


def _timed_content() -> dict[str, OpenAPIMediaType]:
    """The answers of a request with ``timestamps``: JSON whole, server-sent events when it streams."""
    number = Schema(type=OpenAPIType.NUMBER, minimum=0, description="Seconds from the start of the audio")
    span = Schema(type=OpenAPIType.OBJECT, required=["text", "start", "end"],
                  properties={"text": Schema(type=OpenAPIType.STRING), "start": number, "end": number})
    spans = Schema(type=OpenAPIType.ARRAY, items=span)
    timed = Schema(
        type=OpenAPIType.OBJECT, title="TimedSpeech",
        required=["audio", "format", "sample_rate", "duration", "sentences"],
        properties={
            "audio": Schema(type=OpenAPIType.STRING, content_encoding="base64",
                            description="The audio, encoded in `format`"),
            "format": Schema(type=OpenAPIType.STRING, enum=list(FORMATS)),
            "sample_rate": Schema(type=OpenAPIType.INTEGER),
            "duration": Schema(type=OpenAPIType.NUMBER, description="Seconds of audio"),
            "words": Schema(type=OpenAPIType.ARRAY, items=span,
                            description="With `timestamps: word`: each word of the text (as written, without its "
                                        "outer punctuation), in order"),
            "sentences": spans,
            "captions": Schema(type=OpenAPIType.STRING, description="WebVTT or SRT, with `captions`"),
        })
    # One server-sent event (what SSE-aware tools check each event against).
    events = Schema(
        type=OpenAPIType.OBJECT, title="TimedSpeechEvent", required=["event", "data"],
        properties={"event": Schema(type=OpenAPIType.STRING, enum=["audio", "done"]),
                    "data": Schema(type=OpenAPIType.STRING, content_media_type="application/json")},
        description=("With `stream`: `audio` events (`data`: `{audio: base64, sentences, words?}`, the timings "
                     "of what the chunk holds) as the audio is made, then one `done` event (`data`: the JSON "
                     "answer without `audio`)"))
    return {"application/json": OpenAPIMediaType(schema=timed), "text/event-stream": OpenAPIMediaType(schema=events)}


def gateway_operation(*, audio: Iterable[str] | None = None, success_headers: Mapping[str, OpenAPIHeader] | None = None,
                      can_be_malformed: bool = False, content: Mapping[str, OpenAPIMediaType] | None = None,
                      timed: bool = False, description: str | None = None) -> type[Operation]:
    """An `Operation` class that makes a route's documented responses match what it really sends.

    Args:
        audio: Output formats of an audio route: its 200 lists their media types and the synthesis headers.
        success_headers: More headers of the success response (e.g. ``Location``, ``X-Instructions-Ignored``).
        can_be_malformed: Whether the route reads a body (and so can answer 400); otherwise Litestar's
            generic 400 entry is removed.
        content: More media types of the success response (e.g. the events of a ``text/event-stream``).
        timed: The route answers requests with ``timestamps`` with JSON or server-sent events.
        description: What the success response holds, when the route's own words say it better.
    """
    formats = tuple(audio or ())
    headers = dict(success_headers or {})

    @dataclass
    class GatewayOperation(Operation):
        def __post_init__(self) -> None:
            responses: dict[str, Any] = dict(self.responses or {})
            default_400 = responses.get("400")
            if (not can_be_malformed and isinstance(default_400, OpenAPIResponse)
                    and PROBLEM_JSON not in (default_400.content or {})):
                del responses["400"]
            success = next((r for code, r in responses.items() if code.startswith("2")), None)
            if isinstance(success, OpenAPIResponse):
                if formats:
                    success.content = _audio_content(formats)
                    success.description = ("Audio in the requested format; sent as it is made (chunked) when the "
                                           "request streams and the format allows it")
                    success.headers = {**(success.headers or {}), **SYNTHESIS_HEADERS}
                if timed:
                    success.content = {**(success.content or {}), **_timed_content()}
                    success.description = f"{success.description}; with `timestamps`, JSON or server-sent events"
                if headers:
                    success.headers = {**(success.headers or {}), **headers}
                if content:
                    success.content = {**(success.content or {}), **content}
                if description:
                    success.description = description
            unavailable = responses.get("503")
            if isinstance(unavailable, OpenAPIResponse):
                unavailable.headers = {**(unavailable.headers or {}), "Retry-After": RETRY_AFTER}
            self.responses = responses

    return GatewayOperation


def documented(*problems: int, audio: Iterable[str] | None = None, body: bool = False,
               headers: Mapping[str, OpenAPIHeader] | None = None,
               content: Mapping[str, OpenAPIMediaType] | None = None, timed: bool = False,
               description: str | None = None) -> dict[str, Any]:
    """Route decorator keywords that document a route's errors (and audio): ``@post(..., **documented(404))``.

    Every route may answer 500 (an internal problem, never for anything a client sent); a route with a
    body may also answer 400, 413, 415 and 422.
    """
    statuses = {*problems, 500}
    if body:
        statuses |= {400, 413, 415, 422}
    return {
        "responses": problem_responses(statuses),
        "operation_class": gateway_operation(audio=audio, success_headers=headers, can_be_malformed=body,
                                             content=content, timed=timed, description=description),
    }


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Structs with ``forbid_unknown_fields`` say so in their schema: ``additionalProperties: false``."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if not super().is_plugin_supported_field(field_definition):
            return False
        info = msgspec.inspect.type_info(field_definition.type_)
        return bool(getattr(info, "forbid_unknown_fields", False))

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        result: Schema | Reference = super().to_openapi_schema(field_definition, schema_creator)
        schema = (result if isinstance(result, Schema)
                  else schema_creator.schema_registry.from_reference(result).schema)
        schema.additional_properties = False
        return result  # type: ignore[return-value]


OPENAPI_METADATA = "openapi"  # dataclasses.field(metadata={OPENAPI_METADATA: {...}}) on a form field


class FormSchemaPlugin(DataclassSchemaPlugin):
    """Multipart forms (dataclasses) document their fields' rules from ``field(metadata={"openapi": {...}})``.

    The keys are `Schema` attributes (``pattern``, ``min_length``, ``min_items``, ``description``...),
    plus ``required: True`` for a field the server insists on although it has a default (so that its
    absence is a 422 with the gateway's own wording rather than Litestar's 400).
    """

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return super().is_plugin_supported_field(field_definition) and any(
            OPENAPI_METADATA in f.metadata for f in dataclasses.fields(field_definition.type_))

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        result: Schema | Reference = super().to_openapi_schema(field_definition, schema_creator)
        schema = (result if isinstance(result, Schema)
                  else schema_creator.schema_registry.from_reference(result).schema)
        required = set(schema.required or ())
        for form_field in dataclasses.fields(field_definition.type_):
            rules = dict(form_field.metadata.get(OPENAPI_METADATA, {}))
            if rules.pop("required", False):
                required.add(form_field.name)
            prop = (schema.properties or {}).get(form_field.name)
            if isinstance(prop, Schema):
                for key, value in rules.items():
                    setattr(prop, key, value)
        schema.required = sorted(required)
        return result  # type: ignore[return-value]


# -- /docs ---------------------------------------------------------------------------------------------------
def swagger_ui_dir() -> Path | None:
    """The Swagger UI dist files of the installed ``swagger-ui-py`` package (found without importing it)."""
    spec = importlib.util.find_spec(SWAGGER_UI_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        static = Path(location) / "static"
        if all((static / name).is_file() for name in DOCS_ASSETS):
            return static
    return None


def _docs_problem_404(response: Response[Any]) -> Response[Any]:
    """Litestar answers unknown ``/docs/…`` paths with an HTML 404; every error here is problem+json."""
    if response.status_code == 404 and not str(response.media_type).startswith(PROBLEM_JSON):
        return problem(404, "nothing here: no documentation page at this path (see /docs)")
    return response


class OfflineSwaggerRenderPlugin(SwaggerRenderPlugin):
    """Swagger UI whose scripts, styles and icon come from ``/docs/assets/`` (the packaged copy)."""

    def __init__(self, assets: Path | None, **kwargs: Any) -> None:
        self.assets = assets
        super().__init__(
            path="/",
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
            **kwargs,
        )

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)
        if self.assets is not None:
            router.register(create_static_files_router(
                path=ASSETS_PATH.removeprefix(DOCS_PATH), directories=[self.assets], name="docs-assets",
                include_in_schema=False,
            ))

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self.assets is None:
            return (b"<!DOCTYPE html><html><head><title>tts-gateway API</title></head><body>"
                    b"<p>Swagger UI is not installed (pip package <code>swagger-ui-py</code>); the OpenAPI "
                    b"document is at <a href='/docs/openapi.json'>/docs/openapi.json</a>.</p></body></html>")
        return super().render(request, openapi_schema)


_JSON_DOCUMENT = JsonRenderPlugin()  # what Litestar serves at /docs/openapi.json


@get("/openapi.json", media_type=_JSON_DOCUMENT.media_type, include_in_schema=False, sync_to_thread=False)
def openapi_document(request: Request[Any, Any, Any]) -> bytes:
    """The document of ``/docs/openapi.json`` (Litestar's cached copy) at FastAPI's path."""
    return _JSON_DOCUMENT.render(request, request.app.plugins.get(OpenAPIPlugin).provide_openapi_schema())


TAGS = [
    Tag(name="synthesis", description="Text to speech"),
    Tag(name="openai", description="OpenAI-compatible speech and client discovery"),
    Tag(name="voices", description="Built-in voices and registered presets"),
    Tag(name="engines", description="Engines and the languages they speak"),
    Tag(name="cache", description="The phrase cache"),
    Tag(name="operations", description="Liveness, readiness and metrics"),
    Tag(name="legacy", description="The old service's call, unchanged"),
]


def openapi_config() -> OpenAPIConfig:
    assets = swagger_ui_dir()
    if assets is None:
        log.error("the swagger-ui-py package is missing: /docs shows a link to the OpenAPI document only")
    return OpenAPIConfig(
        title="tts-gateway", version=__version__, path=DOCS_PATH,
        description="Multi-engine text-to-speech gateway: XTTS v2, Piper, espeak-ng and Kokoro (and engines "
                    "added by plugins; `GET /v1/engines` lists them). Every error is `application/problem+json` "
                    "`{type, title, status, detail}`. This document is also at `/openapi.json`.",
        tags=TAGS,
        render_plugins=[OfflineSwaggerRenderPlugin(assets)],
        openapi_router=Router(DOCS_PATH, route_handlers=[], include_in_schema=False,
                              after_request=_docs_problem_404),
    )


__all__ = [
    "AUDIO_MEDIA_TYPES",
    "INSTRUCTIONS_HEADER",
    "INSTRUCTIONS_HEADERS",
    "LOCATION_HEADERS",
    "OPENAPI_METADATA",
    "SYNTHESIS_HEADERS",
    "FormSchemaPlugin",
    "StrictStructSchemaPlugin",
    "documented",
    "gateway_operation",
    "openapi_config",
    "openapi_document",
    "swagger_ui_dir",
]
