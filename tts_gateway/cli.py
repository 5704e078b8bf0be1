"""The ``tts-gateway`` command line."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tts_gateway.config import Settings, SettingsError
from tts_gateway.errors import TTSGatewayError

if TYPE_CHECKING:
    from tts_gateway.core.compose import Core

app = typer.Typer(help="tts-gateway: a multi-engine text-to-speech gateway (XTTS v2, Piper, espeak-ng).",
                  no_args_is_help=True, add_completion=False)
voices_app = typer.Typer(help="List, register and remove voice presets (works on the data dir directly).",
                         no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools.", no_args_is_help=True)
registry_app = typer.Typer(help="Check and repair the voice registry.", no_args_is_help=True)
app.add_typer(voices_app, name="voices")
app.add_typer(dev_app, name="dev")
app.add_typer(registry_app, name="registry")
err = Console(stderr=True)
out = Console()


def load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def open_core(settings: Settings) -> Core:
    from tts_gateway.core.compose import build_core

    try:
        return build_core(settings, phrase_cache=False)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from None


def fail(exc: Exception) -> typer.Exit:
    detail = getattr(exc, "detail", None) or str(exc)
    err.print(f"[red]error:[/red] {detail}")
    return typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (TTS_GATEWAY_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TTS_GATEWAY_PORT).")] = None,
) -> None:
    """Start the HTTP server (the default voice loads in the background; /ready says when)."""
    import uvicorn

    from tts_gateway.gateway import create_app

    settings = load_settings()
    settings = settings.with_(host=host or settings.host, port=port if port is not None else settings.port)
    try:
        application = create_app(settings)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from None
    backend = application.state.backend
    if backend is not None:
        backend.start()  # ray.init on the main thread, before uvicorn: Ray dies with the thread that started it
    try:
        # uvicorn drains in-flight requests on SIGTERM before the lifespan shutdown runs.
        uvicorn.run(application, host=settings.host, port=settings.port, log_level="info",
                    timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    finally:
        if backend is not None:
            backend.close()


@app.command()
def say(
    text: Annotated[str, typer.Argument(help="Text to speak ('-' reads standard input).")],
    voice: Annotated[str | None, typer.Option(help="Voice: engine:voice or a preset name.")] = None,
    language: Annotated[str | None, typer.Option(help="Language code, e.g. en, de, zh-cn.")] = None,
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Output file; the extension picks the format.")] = Path(
        "speech.wav"),
    speed: Annotated[float, typer.Option(help="0.25–4.0")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for repeatable output.")] = None,
) -> None:
    """Synthesize TEXT to a file (no server needed), with progress on model loading and long text."""
    from tts_gateway.core.service import SynthesisRequest

    if text == "-":
        text = sys.stdin.read()
    settings = load_settings()
    core = open_core(settings)
    service = core.service
    fmt = out_file.suffix.lstrip(".").lower() or "wav"
    fmt = {"ogg": "opus", "raw": "pcm"}.get(fmt, fmt)
    try:
        plan = service.plan(SynthesisRequest(text=text, voice=voice, language=language, format=fmt,
                                             speed=speed, seed=seed))
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            progress.add_task(f"loading {plan.engine_name} model…", total=None)
            service.engines.ensure_loaded(plan.engine_name)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=len(plan.pieces) < 3) as progress:
            task = progress.add_task("synthesizing", total=len(plan.pieces))
            audio = b"".join(service.run(plan, threading.Event(),
                                         on_piece=lambda done: progress.update(task, completed=done)))
    except Exception as exc:
        raise fail(exc) from None
    out_file.write_bytes(audio)
    err.print(f"wrote {out_file} ({len(audio)} bytes, {plan.engine_name}, voice {plan.voice.name}, "
              f"seed {plan.seed})")


@app.command()
def engines() -> None:
    """List engines: availability (with the reason), languages, capabilities and model."""
    from tts_gateway.engines.base import CloningEngine

    core = open_core(load_settings())
    table = Table("engine", "available", "languages", "cloning", "rate", "model", "reason")
    for name in core.engines.names:
        engine = core.engines.get(name)
        ok, reason = engine.availability()
        languages = list(engine.languages) if ok else []
        table.add_row(name, "yes" if ok else "no", f"{len(languages)}: {', '.join(languages[:8])}"
                      + (" …" if len(languages) > 8 else ""), "yes" if isinstance(engine, CloningEngine) else "no",
                      str(engine.sample_rate), engine.model.id if ok else "", reason or "")
    out.print(table)


@voices_app.command("list")
def voices_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List built-in voices and presets."""
    core = open_core(load_settings())
    voices = core.voices.all()
    if as_json:
        out.print_json(json.dumps(voices))
        return
    table = Table("name", "engine", "kind", "language", "status", "description")
    for v in voices:
        table.add_row(v["name"], v["engine"], v["kind"], str(v.get("language") or ""), v["status"],
                      v.get("description") or "")
    out.print(table)


@voices_app.command("add")
def voices_add(
    name: Annotated[str, typer.Argument(help="Preset name: ^[a-z0-9][a-z0-9_-]{0,63}$")],
    audio: Annotated[list[Path], typer.Argument(help="One or more reference clips (2–60 s in total).")],
    engine: Annotated[str, typer.Option(help="Cloning engine.")] = "xtts",
    language: Annotated[str | None, typer.Option(help="Default language of the preset.")] = None,
    description: Annotated[str, typer.Option()] = "",
    consent: Annotated[bool, typer.Option(help="The speaker consented to being cloned.")] = False,
) -> None:
    """Register a preset: its latents are computed once and stored."""
    core = open_core(load_settings())
    try:
        files = [(p.name, p.read_bytes()) for p in audio]
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                      transient=True) as progress:
            progress.add_task(f"loading {engine} and computing latents…", total=None)
            voice = core.voices.register(name, files, engine_name=engine, language=language,
                                         description=description, consent=consent)
    except Exception as exc:
        raise fail(exc) from None
    out.print_json(json.dumps(voice))


@voices_app.command("rm")
def voices_rm(name: Annotated[str, typer.Argument(help="Preset to delete.")]) -> None:
    """Delete a preset."""
    core = open_core(load_settings())
    try:
        core.voices.delete(name)
    except Exception as exc:
        raise fail(exc) from None
    err.print(f"deleted {name}")


@registry_app.command("check")
def registry_check(fix: Annotated[bool, typer.Option(help="Remove orphans and temp files.")] = False) -> None:
    """Verify every preset's latents and find orphan or half-written files."""
    from tts_gateway.voices import open_registry

    settings = load_settings()
    try:
        registry = open_registry(settings)
    except TTSGatewayError as exc:
        err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from None
    try:
        report = registry.check(fix=fix)
    finally:
        registry.close()
    out.print_json(json.dumps(report))
    if report["broken"] or (not fix and (report["orphans"] or report["temp_files"])):
        raise typer.Exit(1)


@dev_app.command("tiny-xtts")
def dev_tiny_xtts(directory: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")]) -> None:
    """Build the tiny random-weight XTTS v2 checkpoint used by tests (~93 MB, 16 languages)."""
    from tts_gateway.engines.tiny_xtts import build_tiny_xtts

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True) as progress:
        progress.add_task("building tiny XTTS checkpoint…", total=None)
        build_tiny_xtts(directory)
    err.print(f"wrote {directory}/config.json, model.pth, vocab.json")


if __name__ == "__main__":
    app()
