"""The gateway side of the Ray backend: synthesis runs on Serve replicas, Litestar stays the only
HTTP front door.

`RayBackend` is the gateway's runner in ray mode. It turns a `Plan` into a `SynthesisJob` (plain
values: no engine objects, no numpy, nothing that needs the gateway's memory) and sends it to the
deployment of the plan's engine through a `DeploymentHandle`; `ServeCluster` deploys them. It also
answers what the gateway's engine stand-ins (`RemoteEngine`) ask: the replicas' board, conditioning,
blending, load/unload orders. Serve's own HTTP proxy is off. Ray is imported only inside functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

from tts_gateway.config import Settings
from tts_gateway.core.timings import TimedBytes, Timings
from tts_gateway.errors import Conflict, TimedOut, Unavailable
from tts_gateway.ray.cluster import ServeCluster
from tts_gateway.ray.engines import RemotePlugin, remote_engine
from tts_gateway.ray.replica import MAX_VOICES_PER_REPLICA
from tts_gateway.ray.streams import RemoteChunks, awaited, cancel, next_of
from tts_gateway.ray.wire import SynthesisJob, app_name, busy, job_from_plan, timed_from_values, translate

log = logging.getLogger(__name__)
T = TypeVar("T")


class RayBackend:
    """Calls the engines' Serve deployments; see the module docstring.

    Args:
        settings: Gateway settings; the ``ray_*`` ones say where and how to deploy (see `ServeCluster`),
            ``timeout_s`` bounds each call.
        registry: The gateway's voice registry (finds a preset's blob key).
        engines: Engines to deploy; default: every engine of ``settings``, found by an `EngineManager`.
        overrides: Per engine: Serve deployment options (``num_replicas``, ``max_ongoing_requests``,
            ``max_queued_requests``, ...) and ``env`` (extra environment variables of its replicas).
        runtime_env: Ray runtime_env of every replica (e.g. ``{"env_vars": {"PYTHONPATH": ...}}``).
        warm: Replicas load their engine's model when they start, not at the first request.
        max_voices: Presets' latent sets a replica keeps.
    """

    def __init__(
        self,
        settings: Settings,
        registry: Any = None,
        *,
        engines: list[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        warm: bool = True,
        max_voices: int = MAX_VOICES_PER_REPLICA,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.timeout_s = settings.timeout_s
        self.cluster = ServeCluster(settings, overrides=overrides, runtime_env=runtime_env, warm=warm,
                                    max_voices=max_voices)
        self._engines = engines
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, str] = {}  # latents sha256 → blob key (a key never changes for a sha)
        self.started = False
        self.view: Any = None  # the `ClusterView` of the replicas' board, from start()

    def use_registry(self, registry: Any) -> None:
        """The registry presets are read from, when none was given at construction (the app's own)."""
        if self.registry is None:
            self.registry = registry

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def engines(self) -> list[str]:
        if self._engines is None:
            from tts_gateway.engines.manager import EngineManager

            # Every enabled engine gets a deployment: whether it can run is for its replicas to say
            # (the model may be on the GPU nodes only), never checked here.
            self._engines = EngineManager(self.settings).names
        return list(self._engines)

    def engine_manager(self) -> Any:
        """An `EngineManager` of stand-ins (`RemoteEngine`) for the gateway process: no model, no torch."""
        from tts_gateway.engines.manager import EngineManager

        local = EngineManager(self.settings)  # engine objects only tell their kind (cloning, blending)
        wanted = set(local.names if self._engines is None else self._engines)
        remote = [remote_engine(local.get(name), self) for name in local.names if name in wanted]
        self._engines = [engine.name for engine in remote]
        return EngineManager(self.settings.with_(engines=(), plugins=()), extra_plugins=(RemotePlugin(remote),),
                             load_entry_points=False)

    def start(self) -> None:
        """Join or start the cluster and deploy one application per engine. Call it on the main
        thread before ``uvicorn.run``: Ray's processes die with the thread that started them."""
        if self.started:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("RayBackend.start() is not on the main thread; Ray's processes die with this thread")
        self.cluster.connect()
        from tts_gateway.ray.board import ClusterView, board_handle

        self.view = ClusterView(board_handle(create=True))  # before the replicas, which report to it
        self._handles = self.cluster.deploy(self.engines)
        self.view.start()
        # The gateway plans with what replicas report: have every engine's description before serving.
        deadline = time.monotonic() + self.settings.ray_start_timeout_s
        missing = lambda: [e for e in self.engines if self.view.description(e) is None]  # noqa: E731
        if not self.view.wait(lambda: not missing(), max(0.0, deadline - time.monotonic())):
            log.warning("no report yet from the replicas of %s; they are listed unavailable until one arrives",
                        ", ".join(missing()))
        self.started = True

    def close(self) -> None:
        """Disconnect; a local cluster started here is shut down, a joined one keeps its applications."""
        if not self.started and not self.cluster.started_here:
            return
        self._handles.clear()
        self.started = False
        if self.view is not None:
            self.view.close()
            self.view = None
        self.cluster.close()

    # -- calls --------------------------------------------------------------------------------------
    def _latents_key(self, name: str, sha256: str) -> str | None:
        key = self._keys.get(sha256)
        if key is None and self.registry is not None and not name.startswith("upload:"):
            try:
                record = self.registry.get(name)
            except LookupError:
                return None
            if record.latents_sha256 == sha256:
                key = self._keys[sha256] = record.latents_key
        return key

    def job(self, plan: Any) -> SynthesisJob:
        return job_from_plan(plan, self._latents_key)

    def _handle(self, job: SynthesisJob, stream: bool) -> Any:
        handle = self._handles.get(job.engine)
        if handle is None:
            if not self.started:
                raise Unavailable("the Ray backend is not started", retry_after=5)
            raise Unavailable(f"engine {job.engine!r} is not deployed on the Ray cluster", retry_after=30)
        options: dict[str, Any] = {"stream": True} if stream else {}
        if job.multiplexed_id:
            options["multiplexed_model_id"] = job.multiplexed_id
        return handle.options(**options) if options else handle

    async def call(self, plan: Any) -> bytes:
        """The whole result; 503 (Retry-After) when the engine's replicas and queue are full."""
        audio: bytes = await self._call(plan, "synthesize")
        return audio

    async def call_timed(self, plan: Any) -> tuple[bytes, Timings]:
        """A plan with timestamps: the whole result and its timings, made on a replica like any other."""
        items = [timed_from_values(raw) for raw in await self._call(plan, "synthesize_timed")]
        return b"".join(item.audio for item in items), Timings.of(items)

    async def open_stream(self, plan: Any, on_complete: Callable[[], None] | None = None,
                          ) -> tuple[bytes, RemoteChunks]:
        """The first chunk (awaited, so early errors keep their status) and an iterator over the rest.

        ``on_complete`` runs only when the replica finished normally. Leaving the iterator early
        (client disconnect) cancels the replica's work.
        """
        first, rest = await self._open(plan, "stream", on_complete)
        return first if first is not None else b"", rest

    async def open_timed_stream(self, plan: Any, on_complete: Callable[[], None] | None = None,
                                ) -> tuple[TimedBytes | None, RemoteChunks]:
        """Like `open_stream`, with `TimedBytes` items."""
        return await self._open(plan, "stream_timed", on_complete, timed_from_values)

    async def _call(self, plan: Any, method: str) -> Any:
        from ray.serve.exceptions import BackPressureError

        job = await asyncio.to_thread(self.job, plan) if self._needs_lookup(plan) else self.job(plan)
        response = getattr(self._handle(job, stream=False), method).remote(job.to_dict())
        try:
            return await asyncio.wait_for(awaited(response), self.timeout_s)
        except BackPressureError as exc:  # rejected before it ran: nothing to cancel
            raise busy(job.engine, exc) from None
        except TimeoutError:
            cancel(response)
            raise TimedOut(f"synthesis took longer than {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            cancel(response)  # the client went away
            raise
        except Exception as exc:
            raise translate(exc, job.engine) from None

    async def _open(self, plan: Any, method: str, on_complete: Callable[[], None] | None,
                    decode: Callable[[Any], Any] | None = None) -> tuple[Any, RemoteChunks]:
        """The first item of the replica's stream ``method`` (None when it ended at once) and the rest."""
        from ray.serve.exceptions import BackPressureError

        job = await asyncio.to_thread(self.job, plan) if self._needs_lookup(plan) else self.job(plan)
        generator = getattr(self._handle(job, stream=True), method).remote(job.to_dict())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def next_item() -> Any:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            item = await asyncio.wait_for(next_of(generator), remaining)
            return item if decode is None else decode(item)

        finished = False
        try:
            first = await next_item()
        except StopAsyncIteration:
            finished, first = True, None
            if on_complete is not None:
                on_complete()
        except BackPressureError as exc:  # rejected before its first chunk: never cancel it
            raise busy(job.engine, exc) from None
        except TimeoutError:
            cancel(generator)
            raise TimedOut(f"no audio within {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            cancel(generator)
            raise
        except Exception as exc:
            raise translate(exc, job.engine) from None

        return first, RemoteChunks(generator, next_item, finished, on_complete, job.engine, self.timeout_s)

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Registration in a thread of the gateway process; its conditioning is a call to a replica."""
        return await asyncio.to_thread(fn)

    # -- what the gateway's engine stand-ins ask (worker threads, never the event loop) ----------------
    def description(self, engine: str) -> dict[str, Any] | None:
        return self.view.description(engine) if self.view is not None else None

    def live_replicas(self, engine: str) -> list[dict[str, Any]]:
        return self.view.replicas(engine) if self.view is not None else []

    def missing_replicas(self, engine: str) -> str | None:
        """Why ``engine`` has no live replica, or None when it has one."""
        if self.view is None:
            return "the Ray backend is not started"
        if self.view.error:
            return self.view.error
        if not self.view.replicas(engine):
            return f"no live replica of {app_name(engine)} on the Ray cluster"
        return None

    def health(self) -> str | None:
        """Readiness: every deployed engine has a live replica (None), or which ones do not."""
        problems = [problem for problem in map(self.missing_replicas, self.engines) if problem]
        return "; ".join(dict.fromkeys(problems)) or None

    def metric_texts(self) -> list[tuple[str, str]]:
        """(replica id, Prometheus text) of each live replica's engine metrics."""
        return self.view.metrics() if self.view is not None else []

    def _remote_latents(self, engine: str, call: Callable[[Any], Any]) -> dict[str, Any]:
        """The latents a replica returns as blob bytes for ``call(handle)``, errors as their own kinds."""
        from safetensors.numpy import load as st_load

        handle = self._handles.get(engine)
        if handle is None:
            raise Unavailable(f"engine {engine!r} is not deployed on the Ray cluster", retry_after=30)
        response = call(handle)
        try:
            return dict(st_load(response.result(timeout_s=self.timeout_s)))
        except TimeoutError:
            cancel(response)
            raise TimedOut(f"engine {engine!r} took longer than {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except Exception as exc:
            raise translate(exc, engine) from None

    def condition(self, engine: str, audio: Any, rate: int) -> dict[str, Any]:
        """Latents computed by a replica of ``engine`` for float32 mono ``audio`` at ``rate``."""
        import numpy as np

        samples = np.ascontiguousarray(audio, dtype=np.float32).tobytes()
        return self._remote_latents(engine, lambda handle: handle.condition.remote(samples, int(rate)))

    def blend(self, engine: str, weights: Mapping[str, float]) -> dict[str, Any]:
        return self._remote_latents(engine, lambda handle: handle.blend.remote(dict(weights)))

    def order(self, engine: str, action: str) -> None:
        """Have every live replica of ``engine`` load or unload its model, and wait until each has.

        Raises `Conflict` when a replica refuses to unload (it is synthesizing), `EngineUnavailable`
        when one fails to load, `TimedOut` when they do not answer in time.
        """
        import ray

        from tts_gateway.engines.base import EngineUnavailable

        if self.view is None:
            raise Unavailable("the Ray backend is not started", retry_after=5)
        missing = self.missing_replicas(engine)
        if missing:
            raise EngineUnavailable(engine, missing)
        live = {str(state["replica"]) for state in self.view.replicas(engine)}
        seq = int(ray.get(self.view.board.order.remote(engine, action), timeout=10))

        def answers() -> dict[str, dict[str, Any]]:
            return {str(s["replica"]): s.get("order") or {} for s in self.view.replicas(engine)
                    if str(s["replica"]) in live}

        def done() -> bool:
            return all(int(o.get("seq", 0)) >= seq and o.get("state") != "running" for o in answers().values())

        timeout = self.settings.ray_start_timeout_s if action == "load" else self.timeout_s
        if not self.view.wait(done, timeout):
            waiting = sorted(r for r, o in answers().items()
                             if int(o.get("seq", 0)) < seq or o.get("state") == "running")
            raise TimedOut(f"{action} of engine {engine!r}: replicas {', '.join(waiting)} did not finish "
                           f"within {timeout:g} s")
        outcomes = {replica: order for replica, order in answers().items() if int(order.get("seq", 0)) == seq}
        failed = [f"{replica}: {o.get('detail')}" for replica, o in outcomes.items() if o.get("state") == "failed"]
        if failed:
            raise EngineUnavailable(engine, f"{action} failed on replica " + "; ".join(failed))
        if any(o.get("state") == "refused" for o in outcomes.values()):
            raise Conflict(f"engine {engine!r} is busy synthesizing on a replica; try again when it is idle",
                           code="busy", retry_after=5)

    async def stream(self, plan: Any) -> AsyncIterator[bytes]:
        """Encoded chunks as the replica makes them (errors before the first chunk are raised)."""
        first, rest = await self.open_stream(plan)
        try:
            if first:
                yield first
            async for chunk in rest:
                yield chunk
        finally:
            await rest.aclose()

    def _needs_lookup(self, plan: Any) -> bool:
        """A preset whose blob key is not known yet: the registry lookup may block (PostgreSQL)."""
        sha = plan.voice.voice_sha256
        return plan.voice.input.builtin is None and sha is not None and sha not in self._keys

    async def replica_stats(self, engine: str, calls: int = 8) -> list[dict[str, Any]]:
        """`EngineReplica.stats` of the replicas a few calls reach, one entry per process."""
        handle = self._handles[engine]
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(calls):
            stats = await handle.stats.remote()
            seen[stats["pid"]] = stats
        return sorted(seen.values(), key=lambda s: s["pid"])

