"""Issues 14 and 16, HTTP part: typed JSON responses, an OpenAPI document that describes real responses,
offline ``/docs``, and OpenAI client discovery (``/v1/models``, ``/v1/audio/voices``, ``instructions``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import msgspec
import numpy as np
import pytest

from tests import fake_cloning_plugin
from tests.conftest import assert_problem, decode, register, running_app, uvicorn_server
from tts_gateway.gateway import responses

# -- typed JSON responses ---------------------------------------------------------------------------------
BUILTIN_VOICE_KEYS = {"name", "engine", "kind", "language", "languages", "description", "licence", "read_only",
                      "status"}
ENGINE_KEYS = {"name", "available", "reason", "loaded", "languages", "capabilities", "sample_rate", "model", "voices"}


def typed(response: Any, kind: Any) -> Any:
    """The body decoded strictly as the declared response type (fails on a missing or mistyped member)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return msgspec.json.decode(response.content, type=kind, strict=True)


def test_json_routes_answer_their_declared_types(client: Any) -> None:
    voices = typed(client.get("/v1/voices"), responses.VoiceList)
    assert any(isinstance(v, responses.BuiltinVoice) and v.name == "piper:joe" for v in voices.voices)
    # the same members as before the types existed: built-ins carry no preset-only keys
    joe = next(v for v in client.get("/v1/voices").json()["voices"] if v["name"] == "piper:joe")
    assert set(joe) == BUILTIN_VOICE_KEYS and joe["kind"] == "builtin" and joe["read_only"] is True
    one = typed(client.get("/v1/voices/espeak:de"), responses.Voice)  # type: ignore[arg-type]
    assert isinstance(one, responses.BuiltinVoice) and one.engine == "espeak"

    engines = typed(client.get("/v1/engines"), responses.EngineList)
    assert {e.name for e in engines.engines} == {"piper", "espeak"}
    assert set(client.get("/v1/engines/piper").json()) == ENGINE_KEYS
    piper = typed(client.get("/v1/engines/piper"), responses.Engine)
    assert piper.capabilities == responses.EngineCapabilities(cloning=False, streaming=True,
                                                              timestamps=["word", "sentence"])

    languages = typed(client.get("/v1/languages"), list[responses.Language])
    assert next(entry for entry in languages if entry.code == "en").engines == ["piper", "espeak"]
    stats = typed(client.get("/v1/cache"), responses.CacheStats)
    assert stats.enabled is True
    health = typed(client.get("/health"), responses.Health)
    assert health.status == "ok" and health.version
    assert typed(client.get("/ready"), responses.Ready).status == "ready"

    loaded = typed(client.post("/v1/engines/espeak/load"), responses.Engine)
    assert loaded.loaded is True
    unloaded = typed(client.post("/v1/engines/espeak/unload"), responses.Engine)
    assert unloaded.loaded is False


def test_preset_voice_json_is_typed(cloning_client: Any, speech_wav: bytes) -> None:
    client = cloning_client
    created = register(client, "typed", speech_wav, engine="clone")
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/voices/typed"
    preset = msgspec.json.decode(created.content, type=responses.PresetVoice, strict=True)
    assert preset.consent is True and preset.engine == "clone" and len(preset.voice_sha256) == 64
    described = typed(client.get("/v1/voices/typed"), responses.Voice)  # type: ignore[arg-type]
    assert described == preset
    listed = typed(client.get("/v1/voices"), responses.VoiceList)
    assert preset in listed.voices
    assert client.delete("/v1/voices/typed").status_code == 204


@pytest.fixture
def cloning_client(make_settings: Any) -> Iterator[Any]:
    """Piper plus the cheap cloning engine ``clone`` (tests/fake_cloning_plugin.py)."""
    with running_app(make_settings(engines=("piper",)), fake_cloning_plugin) as client:
        yield client


# -- the OpenAPI document -----------------------------------------------------------------------------------
AUDIO_TYPES = {"audio/wav", "audio/L16", "audio/flac", "audio/mpeg", "audio/ogg"}


def test_openapi_declares_audio_media_types_and_headers(client: Any) -> None:
    paths = client.get("/docs/openapi.json").json()["paths"]
    # /v1/synthesize also answers timed requests with JSON or server-sent events; OpenAI's route its events
    events = {"/v1/synthesize": {"application/json", "text/event-stream"}, "/v1/audio/speech": {"text/event-stream"}}
    for path in ("/v1/synthesize", "/v1/audio/speech"):
        ok = paths[path]["post"]["responses"]["200"]
        assert set(ok["content"]) == AUDIO_TYPES | events[path], path
        assert {"X-Engine", "X-Voice", "X-Seed", "X-Model-Sha256", "X-Voice-Sha256"} <= set(ok["headers"])
        assert ok["headers"]["X-Engine"]["required"] is True
    assert set(paths["/synthesize"]["post"]["responses"]["200"]["content"]) == {"audio/wav"}
    assert "X-Instructions-Ignored" in paths["/v1/audio/speech"]["post"]["responses"]["200"]["headers"]
    assert paths["/v1/voices"]["post"]["responses"]["201"]["headers"]["Location"]["required"] is True

    # what the server really sends matches one of them, parameters aside
    for fmt in ("wav", "pcm", "flac", "mp3", "opus"):
        sent = client.post("/v1/synthesize", json={"text": "Hi.", "format": fmt}).headers["content-type"]
        assert sent.split(";")[0] in AUDIO_TYPES, sent


def test_openapi_declares_problem_responses_on_every_route(client: Any) -> None:
    schema = client.get("/docs/openapi.json").json()
    problem = schema["components"]["schemas"]["ProblemDetails"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert problem["properties"]["status"]["type"] == "integer"
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            errors = {code: r for code, r in operation["responses"].items() if code[0] in "45"}
            assert errors, f"{method} {path} documents no errors"
            for code, response in errors.items():
                content = response["content"]
                assert list(content) == ["application/problem+json"], (method, path, code)
                assert content["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/ProblemDetails"}
    synthesize = schema["paths"]["/v1/synthesize"]["post"]["responses"]
    assert {"400", "404", "413", "415", "422", "503", "504"} <= set(synthesize)
    assert synthesize["503"]["headers"]["Retry-After"]["required"] is True
    assert "400" not in schema["paths"]["/v1/engines/{name}"]["get"]["responses"]  # no body: never malformed


def test_the_openapi_document_is_also_at_fastapis_path(client: Any) -> None:
    """Clients and tools probe /openapi.json: the same document as /docs/openapi.json, not a 404."""
    docs = client.get("/docs/openapi.json")
    probed = client.get("/openapi.json")
    assert probed.status_code == 200, probed.text
    assert probed.headers["content-type"] == docs.headers["content-type"]
    assert probed.content == docs.content
    assert "/v1/synthesize" in probed.json()["paths"] and "/openapi.json" not in probed.json()["paths"]


def test_openapi_description_names_every_built_in_engine(client: Any) -> None:
    description = client.get("/docs/openapi.json").json()["info"]["description"]
    for engine in ("XTTS v2", "Piper", "espeak-ng", "Kokoro"):
        assert engine in description, description


def test_unknown_docs_path_is_a_problem(client: Any) -> None:
    assert_problem(client.get("/docs/nothing-here"), 404)


def test_options_lists_every_method_of_a_path(client: Any) -> None:
    # Litestar's own OPTIONS answer listed only the first handler's methods (Allow: OPTIONS, POST).
    for path, methods in [("/v1/voices", "GET, OPTIONS, POST"), ("/v1/voices/piper:joe", "DELETE, GET, OPTIONS"),
                          ("/v1/cache", "DELETE, GET, OPTIONS"), ("/v1/synthesize", "OPTIONS, POST")]:
        answer = client.options(path)
        assert answer.status_code == 204 and answer.headers["allow"] == methods, (path, answer.headers)
    assert set(client.put("/v1/voices").headers["allow"].split(", ")) == {"GET", "OPTIONS", "POST"}


# -- request bodies are read as the schema says -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"text": "hi", "cache": 0}, "cache"),  # a number is not a boolean
        ({"text": "hi", "cache": {}}, "cache"),  # a field named like a dependency is still read as the field
        ({"text": "hi", "speed": "2"}, "speed"),  # nor a string a number
        ({"text": "hi", "stream": "true"}, "stream"),
        ({"text": "hi", "seed": 1.5}, "seed"),
        ({"text": "hi", "sample_rate": "16000"}, "sample_rate"),
    ],
)
def test_json_bodies_are_read_strictly(fake_client: Any, body: dict[str, Any], word: str) -> None:
    assert_problem(fake_client.post("/v1/synthesize", json=body), 422, word)
    if "speed" in body:  # the OpenAI route too
        assert_problem(fake_client.post("/v1/audio/speech", json={"input": "hi", "speed": body["speed"]}), 422, "speed")


def test_no_dependency_is_named_like_a_request_field() -> None:
    import dataclasses

    from tts_gateway.gateway import schemas
    from tts_gateway.gateway.dependencies import DEPENDENCIES

    fields = {f.name for kind in (schemas.SynthesizeBody, schemas.SpeechBody) for f in msgspec.structs.fields(kind)}
    fields |= {f.name for kind in (schemas.VoiceForm, schemas.LegacyForm) for f in dataclasses.fields(kind)}
    fields |= {"name", "legacy"}  # path and query parameters
    assert not fields & set(DEPENDENCIES)


# -- /docs without the internet ------------------------------------------------------------------------------
_ASSET_ATTR = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)""")


def test_docs_load_everything_from_the_gateway(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text
    urls = _ASSET_ATTR.findall(page.text)
    assert len(urls) >= 4, urls  # the bundle, the preset, the stylesheet, the icon
    base = "http://testserver.local/docs"
    for url in urls:
        absolute = urljoin(base, url)
        assert urlsplit(absolute).netloc == "testserver.local", f"/docs loads {url} from another host"
        asset = client.get(urlsplit(absolute).path)
        assert asset.status_code == 200, (url, asset.status_code)
        assert asset.content, url
        if url.endswith(".css"):
            for ref in _CSS_URL.findall(asset.text):
                assert ref.startswith("data:") or not urlsplit(ref).netloc, f"{url} loads {ref}"
    kinds = {urlsplit(url).path.rsplit(".", 1)[-1] for url in urls}
    assert {"js", "css", "png"} <= kinds
    assert "javascript" in client.get("/docs/assets/swagger-ui-bundle.js").headers["content-type"]
    assert_problem(client.get("/docs/assets/nope.js"), 404)


# -- OpenAI discovery and instructions ------------------------------------------------------------------------
def test_openai_models_and_voices(client: Any) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert ids[:2] == ["tts-1", "tts-1-hd"] and {"piper", "espeak"} <= set(ids)
    for model in models["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model" and isinstance(model["created"], int)

    voices = client.get("/v1/audio/voices").json()["voices"]
    assert {"id": "piper:joe", "name": "piper:joe"} in voices and all(set(v) == {"id", "name"} for v in voices)
    legacy = client.get("/v1/audio/voices", params={"legacy": "true"}).json()["voices"]
    assert "piper:joe" in legacy and legacy == [v["id"] for v in voices]
    assert_problem(client.get("/v1/audio/voices", params={"legacy": "maybe"}), 422)


def test_openai_instructions_are_answered_with_a_note(client: Any) -> None:
    body = {"model": "tts-1", "input": "Hello there.", "voice": "alloy", "response_format": "wav"}
    plain = client.post("/v1/audio/speech", json=body)
    assert plain.status_code == 200 and "x-instructions-ignored" not in plain.headers
    told = client.post("/v1/audio/speech", json={**body, "instructions": "Speak like a pirate."})
    assert told.status_code == 200, told.text
    assert told.headers["x-instructions-ignored"] == "no engine here supports instructions"
    audio, rate = decode(told.content)  # the speech itself is what it would have been
    assert rate == 22050 and audio.size / rate > 0.3


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {"TTS_GATEWAY_DATA_DIR": str(tmp_path_factory.mktemp("discovery")), "TTS_GATEWAY_ENGINES": "piper,espeak",
           "TTS_GATEWAY_API_KEYS": "sk-test:synthesize"}
    with uvicorn_server(env) as base:
        yield base


def test_openai_sdk_lists_models_and_reads_instructions_note(sdk_server: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=sdk_server + "/v1", api_key="sk-test")
    models = client.models.list()
    ids = [model.id for model in models]
    assert ids[:2] == ["tts-1", "tts-1-hd"] and {"piper", "espeak"} <= set(ids)
    assert all(model.object == "model" and model.owned_by for model in models)

    speech = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="alloy", input="Hello.", response_format="wav", instructions="Whisper it.")
    assert speech.headers["x-instructions-ignored"] == "no engine here supports instructions"
    audio, rate = decode(speech.content)
    assert rate == 22050 and np.abs(audio).max() > 0.01

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sdk_server + "/v1", api_key="wrong").models.list()
