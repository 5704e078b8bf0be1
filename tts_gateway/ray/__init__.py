"""Where synthesis runs: ``local`` (worker threads in the gateway process) or ``ray`` (Ray Serve).

``TTS_GATEWAY_BACKEND=local`` keeps everything in `core.runner`. ``ray`` sends each
`Plan` to a Serve deployment of its engine; Litestar stays the HTTP front door. Ray is an optional
extra (``pip install .[ray]``) imported only when chosen.

The modules, each importing only those after it (import-linter checks the order):
``backend`` (`RayBackend`, the gateway's runner) · ``cluster`` (join or start the cluster, deploy
the applications) · ``engines`` (the gateway's engine stand-ins) · ``streams`` (Serve responses
awaited and cancelled) · ``replica`` (what runs on a replica) · ``board`` (the replicas' reports)
· ``wire`` (the job, settings and errors as plain values) · ``ray_internals`` (every Ray API
without a stability promise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tts_gateway.config import Settings, SettingsError

if TYPE_CHECKING:
    from tts_gateway.ray.backend import RayBackend


def make_backend(settings: Settings) -> RayBackend | None:
    """The remote backend the settings ask for, not started yet; None for ``local`` (settings checked the
    name); `SettingsError` when Ray is not installed."""
    if settings.backend != "ray":
        return None
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise SettingsError(
            f"TTS_GATEWAY_BACKEND=ray needs Ray Serve: pip install 'tts-gateway[ray]' ({exc})") from None
    from tts_gateway.ray.backend import RayBackend

    return RayBackend(settings)


__all__ = ["make_backend"]
