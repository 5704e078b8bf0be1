"""Where synthesis runs: ``local`` (worker threads in the gateway process) or ``ray`` (Ray Serve).

``TTS_GATEWAY_BACKEND=local`` keeps everything in `gateway.runner`. ``ray`` sends each
`Plan` to a Serve deployment of its engine (`tts_gateway.backends.ray_serve`); Litestar stays the
HTTP front door. Ray is an optional extra (``pip install .[ray]``) imported only when chosen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from config import Settings
from tts_gateway.errors import GatewayError

if TYPE_CHECKING:
    from tts_gateway.backends.ray_serve import RayBackend

BACKENDS = ("local", "ray")


def make_backend(settings: Settings, registry: Any = None) -> RayBackend | None:
    """The remote backend the settings ask for, not started yet; None for ``local``."""
    name = getattr(settings, "backend", "local") or "local"
    if name == "local":
        return None
    if name != "ray":
        raise ValueError(f"TTS_GATEWAY_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"TTS_GATEWAY_BACKEND=ray needs Ray Serve: pip install 'tts-gateway[ray]' ({exc})") from None
    from tts_gateway.backends.ray_serve import RayBackend

    return RayBackend(settings, registry)


async def run_remote(gateway: Any, backend: Any, plan: Any, headers: dict[str, str], key: str | None) -> Any:
    """`Gateway.run_synthesis` after a phrase-cache miss, on a remote backend.

    Serve's ``max_ongoing_requests``/``max_queued_requests`` do the admission control here (a full
    queue is a 503 with Retry-After); the phrase cache and the request metrics stay on the gateway.
    """
    from litestar import Response
    from litestar.response import Stream

    metrics, cache = gateway.metrics, gateway.cache
    try:
        if plan.streams:
            collected: list[bytes] = []

            def remember() -> None:
                if key is not None:
                    gateway.worker.pool.submit(cache.put, key, b"".join(collected), plan.media_type, plan.headers())

            first, rest = await backend.open_stream(plan, on_complete=remember)
            collected.append(first)

            async def body() -> AsyncIterator[bytes]:
                if first:
                    yield first
                async for chunk in rest:
                    collected.append(chunk)
                    yield chunk

            metrics.requests.labels(plan.engine_name, "200").inc()
            return Stream(body(), media_type=plan.media_type, headers=headers)
        audio = await backend.call(plan)
    except GatewayError as exc:
        metrics.requests.labels(plan.engine_name, str(exc.status)).inc()
        raise
    except Exception:
        metrics.requests.labels(plan.engine_name, "500").inc()
        raise
    metrics.requests.labels(plan.engine_name, "200").inc()
    if key is not None:
        import asyncio

        await asyncio.to_thread(cache.put, key, audio, plan.media_type, plan.headers())
    return Response(audio, media_type=plan.media_type, headers=headers)


__all__ = ["BACKENDS", "make_backend", "run_remote"]
