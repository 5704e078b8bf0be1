"""More Piper voices: ``tts-gateway voices pull piper NAME`` through piper-tts's own downloader.

piper-tts (``piper.download_voices``) knows where the voices live (the ``rhasspy/piper-voices``
repository on Hugging Face) and how a name like ``en_GB-alan-medium`` maps to its two files. Its
URLs are fixed to huggingface.co, so ``HF_ENDPOINT`` (a mirror, or a test server) is applied to
them here. The files are fetched into a temporary directory next to the target, checked (the
config is JSON with a sample rate, the model opens in onnxruntime), and only then moved into
place — model first, config last, since a voice exists only when both are there. An interrupted
or failed download leaves nothing behind.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tts_gateway.errors import Invalid, NotFound, Unavailable

HF_DEFAULT = "https://huggingface.co"
VOICE_LIST = "https://huggingface.co/rhasspy/piper-voices (voices.json)"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT).rstrip("/")


@contextmanager
def _endpoint(module: object, endpoint: str) -> Iterator[None]:
    """piper's URL templates with ``endpoint`` in place of huggingface.co, for the duration."""
    saved = {name: getattr(module, name) for name in ("URL_FORMAT", "VOICES_JSON")}
    try:
        for name, value in saved.items():
            setattr(module, name, value.replace(HF_DEFAULT, endpoint))
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _check(model: Path, config: Path) -> None:
    """The files are a Piper voice: a JSON config with a sample rate, and a model onnxruntime opens."""
    try:
        rate = json.loads(config.read_text(encoding="utf-8"))["audio"]["sample_rate"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"the downloaded {config.name} is not a Piper voice config ({exc})", retry_after=None) \
            from None
    if not isinstance(rate, int) or rate <= 0:
        raise Unavailable(f"the downloaded {config.name} has no valid sample rate", retry_after=None)
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a truncated or foreign file
        kind = type(exc).__name__
        raise Unavailable(f"the downloaded {model.name} is not a model onnxruntime can open (cut short, or not "
                          f"a Piper voice: {kind}); nothing was installed, try again", retry_after=None) from None


def pull_voice(name: str, directory: Path) -> Path:
    """Fetch Piper voice ``name`` into ``directory``; returns the model's path. Already there: kept as is.

    Raises `Invalid` for a malformed name, `NotFound` when the endpoint has no such voice,
    `Unavailable` when the endpoint cannot be reached or sends something that is not a voice.
    """
    from piper import download_voices

    name = name.strip()
    if not download_voices.VOICE_PATTERN.match(name):
        raise Invalid(f"{name[:80]!r} is not a Piper voice name: <language>_<REGION>-<name>-<quality>, e.g. "
                      "en_GB-alan-medium (list: " + VOICE_LIST + ")")
    model, config = directory / f"{name}.onnx", directory / f"{name}.onnx.json"
    if model.is_file() and config.is_file() and model.stat().st_size and config.stat().st_size:
        return model
    directory.mkdir(parents=True, exist_ok=True)
    endpoint = hub_endpoint()
    staging = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=directory))
    try:
        with _endpoint(download_voices, endpoint):
            try:
                download_voices.download_voice(name, staging)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise NotFound(f"no Piper voice {name!r} at {endpoint} (list: {VOICE_LIST})",
                                   code="unknown-voice") from None
                raise Unavailable(f"{endpoint} answered {exc.code} {exc.reason} for Piper voice {name!r}",
                                  retry_after=None) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # unreachable, or cut off
                reason = getattr(exc, "reason", None) or exc
                raise Unavailable(f"downloading Piper voice {name!r} from {endpoint} failed: {reason}",
                                  retry_after=None) from None
        _check(staging / model.name, staging / config.name)
        os.replace(staging / model.name, model)
        os.replace(staging / config.name, config)  # last: the voice exists only with both files
        return model
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["hub_endpoint", "pull_voice"]
