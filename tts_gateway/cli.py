"""The ``tts-gateway`` command line."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from tts_gateway.config import Settings, SettingsError
from tts_gateway.errors import TTSGatewayError

if TYPE_CHECKING:
    from tts_gateway.core.compose import Core
    from tts_gateway.engines.xtts_models import ModelDownload

T = TypeVar("T")

app = typer.Typer(help="tts-gateway: a multi-engine text-to-speech gateway (XTTS v2, Piper, espeak-ng, Kokoro).",
                  no_args_is_help=True, add_completion=False)
voices_app = typer.Typer(help="List, register and remove voice presets (works on the data dir directly).",
                         no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools.", no_args_is_help=True)
registry_app = typer.Typer(help="Check and repair the voice registry.", no_args_is_help=True)
app.add_typer(voices_app, name="voices")
app.add_typer(dev_app, name="dev")
app.add_typer(registry_app, name="registry")
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
out = Console()


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None


def open_core(settings: Settings) -> Core:
    from tts_gateway.core.compose import build_core

    try:
        return build_core(settings, phrase_cache=False)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {escape(exc.detail)}")
        raise typer.Exit(2) from None


# What the HTTP API's messages point to, said the way a CLI user does it.
_CLI_POINTERS = {"GET /v1/voices lists the voices": "`tts-gateway voices list` lists the voices",
                 "(see /docs)": "(see `tts-gateway --help`)",
                 "consent: must be true:": "--consent is needed:"}


def fail(exc: Exception) -> typer.Exit:
    detail = getattr(exc, "detail", None) or str(exc)
    for http, cli in _CLI_POINTERS.items():
        detail = detail.replace(http, cli)
    err.print(f"[red]error:[/red] {escape(detail)}")
    return typer.Exit(1)


def model_download(core: Core, engine_name: str) -> ModelDownload | None:
    """The engine's model download when it has one running (XTTS v2 fetched on first use), else None."""
    from tts_gateway.engines.xtts_engine import XttsEngine

    engine = core.engines.get(engine_name)
    hub = engine.hub if isinstance(engine, XttsEngine) else None
    return hub.download if hub is not None and hub.download.running else None


def with_model(core: Core, engine_name: str, doing: str, call: Callable[[], T]) -> T:
    """``call()`` under a spinner saying ``doing``. When it fails because the engine has only just started
    fetching its model (XTTS v2 with the licence accepted), the download runs to its end here, with its
    progress, and ``call`` runs again: a short-lived command must not exit with the download's in-progress
    line as its error (and so end the download); a download that fails is reported with its own error."""
    from tts_gateway.engines.base import EngineUnavailable
    from tts_gateway.engines.xtts_models import PULL_COMMAND

    waited = False
    while True:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task(doing, total=None)
            try:
                return call()
            except EngineUnavailable:
                download = None if waited else model_download(core, engine_name)
                if download is None:
                    raise
                waited = True
                while download.running:
                    progress.update(task, description=escape(download.describe()))
                    time.sleep(0.25)
                if download.state != "done":
                    error = (download.error or "no reason given").rstrip(".")
                    raise EngineUnavailable(engine_name, f"downloading its model ({download.model.repo_id}) failed: "
                                                         f"{error}; `{PULL_COMMAND}` retries it") from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (TTS_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TTS_GATEWAY_PORT).")] = None,
    wyoming_uri: Annotated[str | None, typer.Option(
        help="Also serve Wyoming (Home Assistant) here, e.g. tcp://127.0.0.1:10200 (TTS_GATEWAY_WYOMING_URI).")] = None,
) -> None:
    """Start the HTTP server, and the Wyoming server when a Wyoming URI is set (the default voice loads in
    the background; /ready says when)."""
    import uvicorn

    from tts_gateway.config.settings import parse_wyoming_uri
    from tts_gateway.gateway import create_app
    from tts_gateway.gateway.connections import bounded_h11

    settings = load_settings()
    try:
        uri = parse_wyoming_uri(wyoming_uri) if wyoming_uri is not None else settings.wyoming_uri
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}".replace("TTS_GATEWAY_WYOMING_URI", "--wyoming-uri"))
        raise typer.Exit(2) from None
    settings = settings.with_(host=host or settings.host, port=port if port is not None else settings.port,
                              wyoming_uri=uri)
    problem = _port_problem(settings.host, settings.port)
    if problem:
        err.print(f"[red]error:[/red] {problem}")
        raise typer.Exit(2)
    try:
        application = create_app(settings)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {escape(exc.detail)}")
        raise typer.Exit(2) from None
    grace_s = int(settings.timeout_s) + 5
    asgi: Any = application
    server: uvicorn.Server | None = None
    if settings.wyoming_uri:
        from tts_gateway.wyoming import WyomingServer, alongside

        # One process, one event loop, one Dispatcher (engines, registry, admission, phrase cache, metrics):
        # Wyoming starts after the app's start-up and drains before its shutdown; SIGTERM reaches both.
        asgi = alongside(application, WyomingServer(application.state.tts, settings.wyoming_uri), grace_s=grace_s,
                         should_exit=lambda: server is not None and server.should_exit)
    # uvicorn drains in-flight requests on SIGTERM before the lifespan shutdown runs.
    # Connections cost memory: request headers are bounded in size (h11 enforces one; httptools does
    # not) and in time, as are pauses inside a body; idle keep-alive connections close after 5 s, and
    # past 512 open connections new ones get 503.
    http = bounded_h11(settings.header_timeout_s, settings.body_timeout_s)
    server = uvicorn.Server(uvicorn.Config(asgi, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=grace_s, http=http,
                                           h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=5,
                                           limit_concurrency=MAX_CONNECTIONS))
    backend = application.state.backend
    if backend is not None:
        try:  # ray.init on the main thread, before uvicorn: Ray dies with the thread that started it
            backend.start()
        except TTSGatewayError as exc:  # the cluster cannot place the engines, or a deployment failed
            err.print(f"[red]error:[/red] {exc.detail}")
            backend.close()
            raise typer.Exit(2) from None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if backend is not None:
            backend.close()
    if not server.started:  # start-up failed (port taken, …); uvicorn logged why
        raise typer.Exit(3)


MAX_HEADER_BYTES = 64 * 1024
MAX_CONNECTIONS = 512


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, in words that name the setting to change."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve TTS_GATEWAY_HOST={host}: {exc}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            return (f"cannot listen on {host}:{port}: {reason.lower()}; set TTS_GATEWAY_PORT (or --port) to a free "
                    "port, or stop what is using it")
    return None


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="Text to speak ('-' reads standard input).")],
    voice: Annotated[str | None, typer.Option(help="Voice: engine:voice or a preset name.")] = None,
    language: Annotated[str | None, typer.Option(help="Language code, e.g. en, de, zh-cn.")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Output file; the extension picks the format.")] = Path(
        "speech.wav"),
    speed: Annotated[float, typer.Option(help="0.25–4.0")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for repeatable output.")] = None,
    ssml: Annotated[bool, typer.Option(help="TEXT is an SSML <speak> document.")] = False,
    normalize: Annotated[bool, typer.Option(help="Spell out numbers, dates and abbreviations.")] = True,
    captions_file: Annotated[Path | None, typer.Option(
        "--captions", help="Also write captions of the same audio here (.vtt WebVTT, .srt SubRip).")] = None,
    captions_format: Annotated[str | None, typer.Option(
        help="vtt or srt, whatever the --captions file's extension.")] = None,
) -> None:
    """Synthesize TEXT to a file (no server needed), with progress on model loading and long text."""
    from tts_gateway.core.captions import render
    from tts_gateway.core.service import SynthesisRequest
    from tts_gateway.core.timings import Timings

    if text == "-":
        text = sys.stdin.read()
    # Checked before any work: a synthesis must not be thrown away because a file cannot be written.
    for option, path in (("--out", out_file), ("--captions", captions_file)):
        if path is not None and (path.is_dir() or not path.resolve().parent.is_dir()):
            err.print(f"[red]error:[/red] {option} {escape(str(path))}: "
                      + ("is a directory" if path.is_dir() else "its directory does not exist"))
            raise typer.Exit(2)
    captions = _captions_format(captions_file, captions_format)
    settings = load_settings()
    core = open_core(settings)
    service = core.service
    fmt = out_file.suffix.lstrip(".").lower() or "wav"
    fmt = {"ogg": "opus", "raw": "pcm"}.get(fmt, fmt)
    try:
        plan = service.plan(SynthesisRequest(text=text, voice=voice, language=language, format=fmt,
                                             speed=speed, seed=seed, text_format="ssml" if ssml else "text",
                                             normalize=normalize, captions=captions))
        with_model(core, plan.engine_name, f"loading {plan.engine_name} model…",
                   lambda: service.engines.ensure_loaded(plan.engine_name))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=len(plan.pieces) < 3) as progress:
            task = progress.add_task("synthesizing", total=len(plan.pieces))
            items = list(service.run_timed(plan, threading.Event(),
                                           on_piece=lambda done: progress.update(task, completed=done)))
            audio, timings = b"".join(item.audio for item in items), Timings.of(items)
    except Exception as exc:
        raise fail(exc) from None
    out_file.write_bytes(audio)
    err.print(f"wrote {out_file} ({len(audio)} bytes, {plan.engine_name}, voice {plan.voice.name}, "
              f"seed {plan.seed})")
    if captions_file is not None and plan.captions is not None:
        captions_file.write_text(render(plan.captions, timings.sentences, timings.words), encoding="utf-8")
        err.print(f"wrote {captions_file} ({plan.captions}, {len(timings.sentences)} sentences, "
                  f"{plan.timestamps} timings)")


CAPTION_SUFFIXES = {".vtt": "vtt", ".webvtt": "vtt", ".srt": "srt"}


def _captions_format(path: Path | None, chosen: str | None) -> str | None:
    """The caption format for ``--captions``: ``--captions-format``, else the file's extension."""
    from tts_gateway.core.captions import CAPTION_FORMATS

    if chosen is not None and chosen not in CAPTION_FORMATS:
        err.print(f"[red]error:[/red] --captions-format {escape(chosen)}: use {' or '.join(CAPTION_FORMATS)}")
        raise typer.Exit(2)
    if path is None:
        if chosen is not None:
            err.print("[red]error:[/red] --captions-format needs --captions FILE")
            raise typer.Exit(2)
        return None
    found = chosen or CAPTION_SUFFIXES.get(path.suffix.lower())
    if found is None:
        err.print(f"[red]error:[/red] --captions {escape(str(path))}: name a .vtt or .srt file, or add "
                  "--captions-format vtt|srt")
        raise typer.Exit(2)
    return found


REASON_CHARS = 48  # a reason in the engines table; --json gives it whole


def short_reason(reason: str, most: int = REASON_CHARS) -> str:
    """The head of a reason, for a table cell: up to its first clause, at most ``most`` characters."""
    cuts = [at for at in (reason.find(mark) for mark in (". ", "; ", ", ", " (")) if at > 0]
    head = reason[:min(cuts)] if cuts else reason
    if len(head) > most:
        head = head[:most].rsplit(" ", 1)[0]
    return head if head == reason else head.rstrip(" .,;:") + "…"


@app.command()
def engines(as_json: Annotated[bool, typer.Option("--json", help="Print JSON, with each reason whole.")] = False,
            ) -> None:
    """List engines: availability (with the reason), languages, capabilities and model."""
    from tts_gateway.engines.base import CloningEngine

    core = open_core(load_settings())
    rows: list[dict[str, Any]] = []
    for name in core.engines.names:
        engine = core.engines.get(name)
        ok, reason = engine.availability()
        model = engine.model if ok else None
        rows.append({"name": name, "available": ok, "reason": reason, "languages": list(engine.languages) if ok else [],
                     "cloning": isinstance(engine, CloningEngine), "sample_rate": engine.sample_rate,
                     "model": {"id": model.id, "sha256": model.sha256, "licence": model.licence} if model else None})
    if as_json:
        out.print_json(json.dumps(rows))
        return
    # In 80 columns every row stays a line or three high: no inner borders, the model id cut, the reason short.
    table = Table("engine", "available", Column("languages", max_width=10), "cloning", "rate",
                  Column("model", max_width=12, no_wrap=True, overflow="ellipsis"), Column("reason", min_width=12),
                  box=box.SIMPLE_HEAD, pad_edge=False)
    shortened = False
    for row in rows:
        languages: list[str] = row["languages"]
        reason = row["reason"] or ""
        shortened = shortened or short_reason(reason) != reason
        table.add_row(row["name"], "yes" if row["available"] else "no", f"{len(languages)}: {', '.join(languages[:2])}"
                      + (" …" if len(languages) > 2 else ""), "yes" if row["cloning"] else "no",
                      str(row["sample_rate"]), row["model"]["id"] if row["model"] else "", escape(short_reason(reason)))
    out.print(table)
    if shortened:
        err.print("reasons are shortened here: `tts-gateway engines --json` gives them whole")


@voices_app.command("list")
def voices_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List built-in voices and presets."""
    core = open_core(load_settings())
    try:
        voices = core.voices.all()
    except TTSGatewayError as exc:  # presets unreadable: a list of built-ins alone would hide them
        raise fail(exc) from None
    if as_json:
        out.print_json(json.dumps(voices))
        return
    table = Table("name", "engine", "kind", "language", "status", "description")
    for v in voices:
        table.add_row(v["name"], v["engine"], v["kind"], str(v.get("language") or ""), v["status"],
                      v.get("description") or "")
    out.print(table)


# voices/names.py's VOICE_NAME_RE, written out: the CLI starts without importing the registry. The help
# formatter reads rich markup, so the text is escaped or "[a-z0-9]" would vanish as a tag.
PRESET_NAME_PATTERN = "^[a-z0-9][a-z0-9_-]{0,63}$"


@voices_app.command("add")
def voices_add(
    name: Annotated[str, typer.Argument(help=escape(f"Preset name: {PRESET_NAME_PATTERN} (lower-case letters, "
                                                    "digits, - and _; up to 64 characters)."))],
    audio: Annotated[list[Path], typer.Argument(help="One or more reference clips (2–60 s in total).")],
    engine: Annotated[str, typer.Option(help="Cloning engine.")] = "xtts",
    language: Annotated[str | None, typer.Option(help="Default language of the preset.")] = None,
    description: Annotated[str, typer.Option(help="Shown in voice listings (at most 1000 characters).")] = "",
    consent: Annotated[bool, typer.Option(help="The speaker consented to being cloned.")] = False,
) -> None:
    """Register a preset: its latents are computed once and stored."""
    core = open_core(load_settings())
    try:
        files = [(p.name, p.read_bytes()) for p in audio]
        voice = with_model(core, engine, f"loading {engine} and computing latents…",
                           lambda: core.voices.register(name, files, engine_name=engine, language=language,
                                                        description=description, consent=consent))
    except Exception as exc:
        raise fail(exc) from None
    out.print_json(json.dumps(voice))


@voices_app.command("pull")
def voices_pull(
    engine: Annotated[str, typer.Argument(help="Engine whose voice to fetch: piper.")],
    name: Annotated[str, typer.Argument(help="Voice name, e.g. en_GB-alan-medium (the rhasspy/piper-voices list).")],
) -> None:
    """Fetch a voice with its engine's own downloader into TTS_GATEWAY_PIPER_VOICES_DIR (default: the data
    dir's engines/piper-voices); HF_ENDPOINT picks a mirror. It is `piper:NAME` once the server (re)starts."""
    from tts_gateway.engines.manager import engine_context
    from tts_gateway.engines.piper_engine import default_voices_dir
    from tts_gateway.engines.piper_voices import hub_endpoint, pull_voice

    if engine.strip().lower() != "piper":
        err.print(f"[red]error:[/red] voices can be pulled for piper only, not {engine[:40]!r} (XTTS: "
                  "`tts-gateway models pull xtts`; presets: `tts-gateway voices add`)")
        raise typer.Exit(2)
    settings = load_settings()
    directory = settings.piper_voices_dir or default_voices_dir(engine_context(settings).data_dir)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            progress.add_task(f"downloading Piper voice {name} from {hub_endpoint()}…", total=None)
            model = pull_voice(name, directory)
    except Exception as exc:
        raise fail(exc) from None
    out.print(str(model))
    err.print(f"Piper voice piper:{model.name.removesuffix('.onnx')} is in {directory}; restart the server to use it")


@voices_app.command("rm")
def voices_rm(name: Annotated[str, typer.Argument(help="Preset to delete.")]) -> None:
    """Delete a preset."""
    core = open_core(load_settings())
    try:
        core.voices.delete(name)
        if core.lexicon is not None:  # a later preset of this name starts without these entries
            core.lexicon.drop_scope(name)
    except Exception as exc:
        raise fail(exc) from None
    err.print(f"deleted {name}")


@registry_app.command("check")
def registry_check(fix: Annotated[bool, typer.Option(help="Remove orphans and temp files.")] = False) -> None:
    """Verify every preset's latents and find orphan or half-written files. --fix never deletes a blob a
    rebuild could still recover: with an index that is damaged, missing or lists nothing while blobs are
    stored, it deletes nothing and says to run `tts-gateway registry rebuild`."""
    from tts_gateway.voices import open_registry

    settings = load_settings()
    try:
        registry = open_registry(settings, rebuild_damaged=False)  # a check reports; it repairs nothing unasked
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from None
    try:
        report = registry.check(fix=fix)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from None
    finally:
        registry.close()
    out.print_json(json.dumps(report))
    for reason in report.get("rebuild_needed", []):
        err.print(f"[yellow]warning:[/yellow] {reason}")
    if report["broken"] or report.get("rebuild_needed") or (
            not fix and (report["orphans"] or report["temp_files"])):
        raise typer.Exit(1)


@registry_app.command("rebuild")
def registry_rebuild() -> None:
    """Rebuild the local voice index from the record files and latent blobs on disk, verifying every blob's
    sha256; the old index is moved aside (never deleted). A running server picks the new index up by itself."""
    import sqlite3

    from tts_gateway.voices import rebuild_index
    from tts_gateway.voices.store import storage_error

    settings = load_settings()
    if settings.registry_url:
        err.print("[red]error:[/red] the voice registry is PostgreSQL (TTS_GATEWAY_REGISTRY_URL); "
                  "`registry rebuild` rebuilds the local index only")
        raise typer.Exit(2)
    try:
        report = rebuild_index(settings.data_dir)
    except (OSError, sqlite3.Error) as exc:
        problem = storage_error(exc, settings.data_dir)
        err.print(f"[red]error:[/red] the voice index was not rebuilt: {problem.detail if problem else exc}")
        raise typer.Exit(2) from None
    out.print_json(json.dumps(report))
    aside = f"; the old index is in {report['moved_aside']}" if report["moved_aside"] else ""
    err.print(f"rebuilt {report['index']}: {len(report['voices'])} voices ({len(report['broken'])} broken), "
              f"{report['upload_cache']} upload-cache entries{aside}")
    if report["broken"]:
        err.print("broken voices cannot be used: delete them (`tts-gateway voices rm NAME`) and register them again")


@dev_app.command("tiny-xtts")
def dev_tiny_xtts(
    directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")],
    size: Annotated[str, typer.Option(help="tiny (tests: 2 GPT layers × 64, ~93 MB) or v2 (XTTS v2's real "
                                           "dimensions, 30 × 1024, ~1.9 GB: random weights for measuring real "
                                           "costs)")] = "tiny",
    max_audio_tokens: Annotated[int | None, typer.Option(help="Audio tokens per sentence (random weights never "
                                                              "stop early); default 48 (tiny) or 72 (v2)",
                                                         min=8, max=605)] = None,
) -> None:
    """Build a random-weight XTTS v2 checkpoint with the real files and loading path (16 languages)."""
    from tts_gateway.engines.tiny_xtts import V2_MAX_AUDIO_TOKENS, V2_SIZE, build_tiny_xtts

    if size not in ("tiny", "v2"):
        raise typer.BadParameter("must be tiny or v2", param_hint="--size")
    dimensions: dict[str, Any] = dict(V2_SIZE) if size == "v2" else {}
    tokens = max_audio_tokens or (V2_MAX_AUDIO_TOKENS if size == "v2" else 48)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True) as progress:
        progress.add_task(f"building the {size} XTTS checkpoint…", total=None)
        build_tiny_xtts(directory, max_audio_tokens=tokens, **dimensions)
    err.print(f"wrote {directory}/config.json, model.pth, vocab.json, speakers_xtts.pth")


@dev_app.command("compare-precision")
def dev_compare_precision(
    checkpoint: Annotated[Path | None, typer.Option(help="A checkpoint directory; default: "
                                                         "TTS_GATEWAY_XTTS_CHECKPOINT, else XTTS v2 from the "
                                                         "Hugging Face cache")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every sentence (both precisions)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON")] = False,
) -> None:
    """How int8 (TTS_GATEWAY_XTTS_PRECISION=int8) compares with fp32 on your machine and model: identical
    audio tokens, logits difference, speaker similarity of the outputs, time."""
    from tts_gateway.engines.xtts_precision import compare_precision

    settings = load_settings()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True) as progress:
        progress.add_task("loading XTTS twice (fp32, int8) and speaking the sentences…", total=None)
        try:
            report = compare_precision(checkpoint or settings.xtts_checkpoint, seed=seed, device=settings.device,
                                       accept_licence=settings.accept_cpml)
        except TTSGatewayError as exc:
            raise fail(exc) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table("sentence", "same tokens", "logits Δmax", "speaker sim.", "fp32 s", "int8 s")
    for row in report["sentences"]:
        table.add_row(escape(row["text"][:40]), f"{row['identical_token_share']:.0%}",
                      f"{row['first_logits_max_abs_diff']:.3g}", f"{row['speaker_similarity']:.3f}",
                      f"{row['seconds'][0]:.2f}", f"{row['seconds'][1]:.2f}")
    out.print(table)
    out.print(f"int8 is {report['int8_speed_up']}× as fast; {report['identical_token_share']:.0%} of audio tokens "
          f"identical; lowest speaker similarity {report['speaker_similarity_min']:.3f}")


models_app = typer.Typer(help="Fetch engine models (XTTS v2 through coqui-tts's model manager).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("pull")
def models_pull(
    model: Annotated[str, typer.Argument(help="Model to fetch: xtts (XTTS v2, Hugging Face repo tts-hub/XTTS-v2).")],
    accept_license: Annotated[bool, typer.Option(
        "--accept-license", help="Accept the Coqui Public Model License (https://tts-hub.github.io/cpml); recorded as "
                                 "coqui-tts's tos_agreed.txt, so the gateway may use the model later.")] = False,
) -> None:
    """Download a model into coqui-tts's cache (the Hugging Face cache: HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE
    apply), with a progress bar. Run it again after an interruption: finished files are kept."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    from tts_gateway.engines import xtts_models

    if model.strip().lower() not in ("xtts", "xtts_v2", "xtts-v2"):
        err.print(f"[red]error:[/red] unknown model {model!r}; models: xtts")
        raise typer.Exit(2)
    entry = xtts_models.coqui_model()
    if accept_license:
        recorded = xtts_models.record_acceptance(entry)
        err.print(f"licence accepted: Coqui Public Model License ({xtts_models.CPML_URL}); recorded in {recorded}")
    elif not xtts_models.licence_accepted(entry, False):
        err.print(f"[red]error:[/red] XTTS v2 is under the Coqui Public Model License ({xtts_models.CPML_URL}: "
                  "non-commercial use unless you bought a licence from Coqui); to accept it, run "
                  f"`{xtts_models.PULL_COMMAND}`")
        raise typer.Exit(2)
    download = xtts_models.ModelDownload(entry)
    download.start(accept=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeElapsedColumn(), console=err) as progress:
            task = progress.add_task(f"XTTS v2 ({entry.repo_id})", total=None)
            while download.running:
                now = download.progress()
                progress.update(task, completed=now.done, total=now.total)
                time.sleep(0.25)
            if download.state == "done":
                final = download.progress()
                progress.update(task, completed=final.total or final.done, total=final.total or final.done)
    except KeyboardInterrupt:
        download.cancel()
        err.print("interrupted; run the command again to continue (finished files are kept)")
        raise typer.Exit(130) from None
    if download.state != "done" or download.checkpoint is None:
        err.print(f"[red]error:[/red] downloading XTTS v2 from {xtts_models.hub_endpoint()} failed: {download.error}")
        raise typer.Exit(1)
    out.print(str(download.checkpoint))
    err.print(f"XTTS v2 is in {download.checkpoint}; the gateway uses it when TTS_GATEWAY_XTTS_CHECKPOINT is unset")


if __name__ == "__main__":
    app()
