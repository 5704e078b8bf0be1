"""Fuzzing the HTTP API: schemathesis against the gateway's own OpenAPI schema, plus raw request bodies.

``test_fuzz_fake`` / ``test_fuzz_piper`` load ``GET /docs/openapi.json`` from the app in process (ASGI; the
lifespan and warm-up run) and give every operation schemathesis' examples, coverage (boundaries, negative
values, missing fields, unexpected methods) and fuzzing phases, with positive and negative data, bounded and
derandomized so a run is reproducible:

* fake run: the fake engine (``fake:one``) plus a fake *cloning* engine registered as ``xtts``, so the
  multipart endpoints (``POST /v1/voices``, the legacy ``POST /synthesize``) get past the engine lookup and
  their uploads reach the real reference-audio decoder, voice registry and latent store;
* piper run: the built-in Piper engine, fewer examples.

``test_fuzz_raw_bodies`` covers what schemathesis cannot send, because it always serialises well-formed
UTF-8 JSON and multipart: mutated bytes, invalid UTF-8, deep nesting, odd part charsets, truncation.

Contract on every response: no 5xx at all (``not_a_server_error``; an engine fault mapped to 503 counts), and
every 4xx/5xx is ``application/problem+json`` with ``type``, ``title``, ``status`` (= the HTTP status) and
``detail`` (``problem_json``); plus every one of schemathesis' built-in checks.

Run: ``.venv/bin/python -m pytest tests/test_fuzz.py`` (under a minute on 2 cores);
``make fuzz`` runs only these. ``FUZZ_EXAMPLES=300`` (default 25, per operation) runs deeper.
A failure shows schemathesis' report with a ``curl`` reproduction (for the raw bodies: the exact request),
and a note with the server's ERROR log, traceback included, for that request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

# hypothesis comes with schemathesis, hence after the importorskip
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.python import asgi as schemathesis_asgi  # noqa: E402

from tests.conftest import running_app, voice_audio, wait_until, wav  # noqa: E402
from tests.fake_engine import RATE, FakeEngine, FakePlugin  # noqa: E402
from tts_gateway.config import Settings  # noqa: E402
from tts_gateway.engines.base import BuiltinVoice, Capabilities  # noqa: E402
from tts_gateway.engines.manager import EngineManager  # noqa: E402
from tts_gateway.gateway import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = "/docs/openapi.json"
SEED = 20240601
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # per operation, fake run; the others scale with it


pytestmark = pytest.mark.fuzz


# -- the contract ------------------------------------------------------------------------------------
PROBLEM_KEYS = {"type", "title", "status", "detail"}


def problem_errors(status: int, content_type: str, content: bytes) -> list[str]:
    """What is wrong with the shape of an error response (nothing for 1xx-3xx)."""
    if status < 400:
        return []
    head = f"{status} response"
    if not content_type.startswith("application/problem+json"):
        return [f"{head} is {content_type or 'untyped'}, not application/problem+json"]
    try:
        body = json.loads(content)
    except ValueError:
        return [f"{head}: problem body is not JSON: {content[:200]!r}"]
    if not isinstance(body, dict):
        return [f"{head}: problem body is not an object: {body!r}"]
    errors = []
    if missing := PROBLEM_KEYS - set(body):
        errors.append(f"{head}: problem body lacks {sorted(missing)}: {body}")
    if "status" in body and body["status"] != status:
        errors.append(f"{head}: problem status {body['status']!r} != HTTP {status}")
    detail = body.get("detail")
    if "detail" in body and not isinstance(detail, str):
        errors.append(f"{head}: problem detail is not a string: {detail!r}")
    if isinstance(detail, str) and "Traceback" in detail:
        errors.append(f"{head}: problem detail leaks a traceback")
    return errors


def problem_json(ctx: Any, response: Any, case: Any) -> None:
    """Schemathesis check: every error response is problem+json with the gateway's four keys."""
    content_type = (response.headers.get("content-type") or [""])[0]
    errors = problem_errors(response.status_code, content_type, response.content)
    assert not errors, "; ".join(errors)


# Every built-in check is on: not_a_server_error, status_code_conformance (every status is documented),
# content_type_conformance (audio/* for audio, application/problem+json for errors), response_schema_conformance,
# response_headers_conformance (the synthesis headers, Retry-After on 503, Location on 201),
# positive_data_acceptance, negative_data_rejection, missing_required_header, unsupported_method,
# allow_header_conformance and ignored_auth. (use_after_free / ensure_resource_availability need the stateful
# phase, which pytest runs lack.)
#
# positive_data_acceptance expects schema-valid data to get 2xx (or 401/403/404/409/429/5xx, its defaults). The
# schema carries every rule on a single field (text not blank, format enum, speed/rate/seed ranges, name pattern,
# at least one clip...), but on these operations the contract answers schema-valid data with 422 (or 415)
# where validity depends on other data: the check expects those statuses there too, and only there.
POSITIVE_DATA_DEFAULT = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
POSITIVE_DATA_ALSO: dict[tuple[str, str], tuple[list[str], str]] = {
    ("POST", "/v1/synthesize"): (["422"], "a language the voice's engine lacks; a sample_rate mp3 or opus cannot "
                                          "encode (both depend on the voice and format); text that is not the "
                                          "SSML text_format says"),
    ("POST", "/v1/audio/speech"): (["422"], "a model that names no engine; a voice of another engine than the model"),
    ("POST", "/dev/captioned_speech"): (["422"], "a model that names no engine; a lang_code the voice's engine "
                                                 "lacks; word timestamps from an engine that gives only sentences"),
    ("POST", "/v1/voices"): (["415", "422"], "reference audio that is not 2–60 s of decodable sound (415: not "
                                             "audio); an engine that cannot clone or a language it lacks"),
    ("POST", "/synthesize"): (["415", "422"], "speaker_audio that is not 2–60 s of decodable sound"),
    ("POST", "/v1/text/normalize"): (["422"], "a language the voice's engine lacks; text that is not the SSML "
                                              "text_format says"),
    ("PUT", "/v1/lexicon/{language}/{word}"): (["422"], "a language code or word the lexicon does not take; "
                                                        "not exactly one of respelling and ipa"),
    ("GET", "/v1/lexicon/{language}/{word}"): (["422"], "a language code the lexicon does not take"),
    ("DELETE", "/v1/lexicon/{language}/{word}"): (["422"], "a language code the lexicon does not take"),
}

# Values worth trying often, so that fuzzing gets past voice/format lookups into synthesis and the registry.
# Each is used with probability 1/2; the other half stays schemathesis' own generation.
DICTIONARIES: dict[str, list[Any]] = {
    "names": ["fake", "xtts", "piper", "espeak", "fake:one", "piper:joe", "fuzz-voice", "FAKE", "fake:", ":one",
              "a" * 65, "..", "%2e%2e"],
    "voices": ["fake:one", "piper:joe", "fuzz-voice", "alloy", "echo", "fake:two", "xtts:one", "fake:", ":", "",
               "Fuzz-Voice", "a" * 64],
    "voice_names": ["fuzz-voice", "fuzz_2", "a" * 64, "a" * 65, "Fuzz", "-x", "fake:one", ""],
    "engines": ["xtts", "fake", "piper", "espeak", "", "XTTS"],
    "models": ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "fake", "xtts", "piper", "whisper-1"],
    "formats": ["wav", "mp3", "opus", "flac", "pcm", "aac", "ogg", "WAV", ""],
    "languages": ["en", "de", "EN", "en-US", "en_GB", "fr", "zz", "", "-"],
    "texts": ["Hello.", "Hello there. How are you today?", "Dr. Smith lives at 221b Baker St. in London.",
              "1234567890", "¿Qué tal?", "日本語のテキスト。", "🙂🙂", "a\u0301", "\u202eevil", "...", " x ",
              "x" * 600],
    "rates": [8000, 16000, 22050, 24000, 44100, 48000, 7999, 48001, 0, -1, 2**31],
    "speeds": [0.25, 0.5, 1.0, 2.0, 4.0, 0.2499, 4.01, 0, -1],
    "seeds": [0, 1, 2**32 - 1, 2**32, -1],
    "consents": ["true", "1", "yes", "on", "false", "0"],
}
BINDINGS = {
    "path.name": "names",
    "body.voice": "voices",
    "body.name": "voice_names",
    "body.engine": "engines",
    "body.model": "models",
    "body.format": "formats",
    "body.response_format": "formats",
    "body.language": "languages",
    "body.text": "texts",
    "body.input": "texts",
    "body.sample_rate": "rates",
    "body.speed": "speeds",
    "body.seed": "seeds",
    "body.consent": "consents",
}


def schemathesis_config(max_examples: int) -> Any:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "request-timeout": 120,  # generous: a loaded 2-core CI box must not turn into a flaky failure
        # Hypothesis' too_slow health check times data generation: on a loaded machine that is a verdict about
        # the machine, not the gateway (deadline=None already, as schemathesis sets it).
        "suppress-health-check": ["too_slow"],
        "generation": {"mode": "all", "max-examples": max_examples, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
        "operations": [
            {"include-name": f"{method} {path}",
             "checks": {"positive_data_acceptance": {"expected-statuses": POSITIVE_DATA_DEFAULT + also}}}
            for (method, path), (also, _why) in POSITIVE_DATA_ALSO.items()
        ],
        "dictionaries": {name: {"values": values} for name, values in DICTIONARIES.items()},
        "parameters": {key: {"dictionary": name, "probability": 0.5} for key, name in BINDINGS.items()},
    })


# -- uploads that look like audio -------------------------------------------------------------------------
_CLIPS = [
    wav(voice_audio(2.5)),  # a usable reference
    wav(voice_audio(3.0, rate=22050), 22050, channels=2, subtype="FLOAT"),
    wav(np.zeros(8000 * 5 // 2, np.float32), 8000),  # silent
    wav(voice_audio(0.5)),  # too short
    wav(voice_audio(0.0)),  # no samples
]
_MAGICS = [b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b"caff", b".snd", b"wvpk", b"\xff\xfb"]


@st.composite
def audio_bytes(draw: st.DrawFn) -> bytes:
    """Valid, silent, short, truncated and corrupted WAVs; audio magic + garbage; plain random bytes."""
    kind = draw(st.sampled_from(["clip", "truncated", "corrupted", "magic", "random"]))
    clip = draw(st.sampled_from(_CLIPS))
    if kind == "clip":
        return clip
    if kind == "truncated":
        return clip[: draw(st.integers(0, len(clip) - 1))]
    if kind == "corrupted":
        data = bytearray(clip)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, min(63, len(data) - 1)))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "magic":
        return draw(st.sampled_from(_MAGICS)) + draw(st.binary(max_size=512))
    return draw(st.binary(max_size=512))


def _with_audio(context: Any, body: Any) -> Any:
    """flatmap_body hook: half the time, put audio-like uploads into the multipart endpoints' file fields."""
    if not isinstance(body, dict):
        return st.just(body)
    if "speaker_audio" in body:
        return st.one_of(st.just(body), audio_bytes().map(lambda data: {**body, "speaker_audio": data}))
    if "audio" in body:
        files = st.lists(audio_bytes(), min_size=1, max_size=3)
        return st.one_of(st.just(body), files.map(lambda data: {**body, "audio": data}))
    return st.just(body)


# -- a cloning engine without a model ---------------------------------------------------------------------
class FakeCloner(FakeEngine):
    """Stands in for XTTS under its name (POST /v1/voices and the legacy /synthesize default to ``xtts``).

    Uploads go through the real decoding, checks, registry and latent store; the "latents" are a cheap
    summary of the reference audio, and synthesis is FakeEngine's tone.
    """

    name = "xtts"
    capabilities = Capabilities(streaming=True, deterministic=True)
    reference_sample_rate = RATE

    def voices(self) -> list[BuiltinVoice]:
        return []

    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        summary = [float(audio.mean()), float(audio.std()), float(audio.size)]
        return {"speaker_embedding": np.asarray(summary, np.float32)}


def fake_plugins() -> tuple[FakePlugin, ...]:
    return FakePlugin(FakeEngine()), FakePlugin(FakeCloner())


def _add_server_log(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    errors = [formatter.format(r) for r in caplog.records if r.levelno >= logging.ERROR]
    if errors:
        exc.add_note("server log for this request:\n" + "\n".join(errors))


# -- schemathesis runs ------------------------------------------------------------------------------------
def _load_schema(settings: Settings, plugins: tuple[Any, ...], max_examples: int) -> Iterator[Any]:
    """Build the app, load its schema over ASGI (which starts the lifespan), wait for warm-up, stop at the end."""
    manager = EngineManager(settings, extra_plugins=plugins, load_entry_points=False)
    app = create_app(settings, manager)
    # schemathesis' ASGI client runs the lifespan once per app and keeps it up for every later request.
    schema = schemathesis.openapi.from_asgi(SCHEMA_PATH, app, config=schemathesis_config(max_examples))
    schema.hook("flatmap_body")(_with_audio)
    readiness = app.state.tts.readiness  # its warm-up task was started by the lifespan
    try:
        wait_until(lambda: readiness.task is None or readiness.task.done(), "the warm-up (engine load, canary)")
        assert readiness.ready, readiness.detail
        yield schema
    finally:
        schemathesis_asgi.shutdown_lifespans()  # release worker threads, engines, registry, cache


@pytest.fixture
def fake_schema(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    yield from _load_schema(make_settings(engines=(), default_voice="fake:one"), fake_plugins(), EXAMPLES)


@pytest.fixture
def piper_schema(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    settings = make_settings(engines=("piper",), default_voice="piper:joe")
    yield from _load_schema(settings, (), max(5, EXAMPLES * 2 // 5))


@pytest.fixture(autouse=True)
def _schemathesis_pytest9_nodeid(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy schemas (from_fixture) read and rewrite `node._nodeid`, an attribute pytest 9
    # does not have; give them one (it only feeds their report labels).
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid  # type: ignore[attr-defined]


def _only_form_field_types_changed(case: Any) -> bool:
    """A negative case whose only mutations change a multipart field's type (``"text": 0``): every part goes
    on the wire as text, so the server reads "0", a valid text. Schemathesis sees this itself for plain
    forms, but not when a file part is in the body (it cannot validate the file's bytes as sent)."""
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    mutations = getattr(data, "mutations", None)
    return bool(mutations) and (case.media_type or "").startswith("multipart/") and all(
        mutation.operator.value == "change_type" and getattr(mutation.parameter_location, "value", None) == "body"
        for mutation in mutations)


def _call_and_validate(case: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    excluded = [schemathesis.checks.negative_data_rejection] if _only_form_field_types_changed(case) else []
    try:
        case.call_and_validate(additional_checks=[problem_json], excluded_checks=excluded)
    except BaseException as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
        _add_server_log(exc, caplog)
        raise


fake = schemathesis.pytest.from_fixture("fake_schema")
piper = schemathesis.pytest.from_fixture("piper_schema")


@fake.parametrize()
def test_fuzz_fake(case: Any, caplog: pytest.LogCaptureFixture) -> None:
    _call_and_validate(case, caplog)


@piper.parametrize()
def test_fuzz_piper(case: Any, caplog: pytest.LogCaptureFixture) -> None:
    _call_and_validate(case, caplog)


# -- raw bodies -------------------------------------------------------------------------------------------
JSON_BODIES = {
    "/v1/synthesize": {"text": "Hello there.", "voice": "fake:one", "format": "wav"},
    "/v1/audio/speech": {"input": "Hello there.", "model": "tts-1", "voice": "alloy"},
}
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc3", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
BOUNDARY = "fuzzBoundary7MA4YWxkTrZu0gW"


@st.composite
def raw_json(draw: st.DrawFn, kind: str) -> tuple[str, str, bytes]:
    """A valid body with bytes flipped, inserted or dropped; with invalid UTF-8 in a string; deeply nested."""
    path = draw(st.sampled_from(sorted(JSON_BODIES)))
    body = bytearray(json.dumps(JSON_BODIES[path]).encode())
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(body) - 1))
            byte = draw(st.integers(0, 255))
            edit = draw(st.sampled_from(["set", "insert", "delete"]))
            if edit == "set":
                body[at] = byte
            elif edit == "insert":
                body.insert(at, byte)
            elif len(body) > 1:
                del body[at]
    elif kind == "utf8":
        at = body.index(b"Hello") + draw(st.integers(0, len("Hello there.")))
        body[at:at] = draw(st.sampled_from(INVALID_UTF8))
    else:
        depth = draw(st.sampled_from([1, 64, 500, 998, 999, 1000, 5000]))
        key = b'"text"' if path == "/v1/synthesize" else b'"input"'
        body = bytearray(b"{" + key + b":" + b"[" * depth + b"]" * depth + b"}")
    return path, "application/json", bytes(body)


@st.composite
def raw_multipart(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """Multipart bodies with arbitrary field bytes, odd part charsets, audio-like files, truncation."""
    path = draw(st.sampled_from(["/v1/voices", "/synthesize"]))
    if path == "/v1/voices":
        fields, file_field = ["name", "engine", "language", "description", "consent"], "audio"
    else:
        fields, file_field = ["text", "language"], "speaker_audio"
    parts = []
    for name in draw(st.lists(st.sampled_from(fields), min_size=1, unique=True)):
        value = draw(st.one_of(st.sampled_from([b"fuzz-voice", b"Hello there.", b"en", b"xtts", b"true"]),
                               st.binary(max_size=16)))
        charset = draw(st.sampled_from([None, None, "utf-8", "latin-1", "utf-16", "x-bogus"]))
        content_type = f"\r\nContent-Type: text/plain; charset={charset}" if charset else ""
        parts.append(f'Content-Disposition: form-data; name="{name}"{content_type}'.encode() + b"\r\n\r\n" + value)
    for index in range(draw(st.integers(0, 2))):
        data = draw(audio_bytes())
        disposition = f'Content-Disposition: form-data; name="{file_field}"; filename="clip{index}.wav"'
        parts.append(disposition.encode() + b"\r\nContent-Type: audio/wav\r\n\r\n" + data)
    delimiter = f"--{BOUNDARY}\r\n".encode()
    body = b"".join(delimiter + part + b"\r\n" for part in parts) + f"--{BOUNDARY}--\r\n".encode()
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return path, f"multipart/form-data; boundary={BOUNDARY}", body


@pytest.fixture
def cloning_client(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    # Started in setup, not in the test: the app's logging set-up would otherwise drop caplog's handler.
    with running_app(make_settings(engines=(), default_voice="fake:one"), *fake_plugins()) as client:
        yield client


@pytest.mark.parametrize("kind", ["json-mutated", "json-utf8", "json-nesting", "multipart"])
def test_fuzz_raw_bodies(kind: str, cloning_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the bytes, the answer is a problem+json 4xx (or a success), never a 5xx."""

    @settings(max_examples=EXAMPLES * 5, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=raw_multipart() if kind == "multipart" else raw_json(kind.removeprefix("json-")))
    def post(request: tuple[str, str, bytes]) -> None:
        path, content_type, body = request
        caplog.clear()
        response = cloning_client.post(path, content=body, headers={"content-type": content_type})
        status = response.status_code
        errors = [f"server error {status}: {response.content[:300]!r}"] if status >= 500 else []
        errors += problem_errors(status, response.headers.get("content-type", ""), response.content)
        if errors:
            # schemathesis turns off Hypothesis' printing of falsifying examples, so the request goes here
            shown = f"{body!r}" if len(body) <= 1000 else f"{body[:1000]!r}... ({len(body)} bytes)"
            failure = AssertionError("; ".join(errors) + f"\nrequest: POST {path}\nContent-Type: {content_type}"
                                     f"\nbody: {shown}")
            _add_server_log(failure, caplog)
            raise failure

    post()
