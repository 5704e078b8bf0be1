"""The cluster side of the Ray backend: join or start a Ray cluster and deploy one Serve application
per engine, sized to fit what the cluster has free.

Settings are read from `Settings` (``ray_*``, ``engine_threads``); per-engine deployment overrides
and the replicas' ``runtime_env`` come from the caller. A deployment that cannot be placed, or does
not start in time, is a one-line `Unavailable` naming it, never a wait without end.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from tts_gateway.config import Settings
from tts_gateway.errors import Unavailable
from tts_gateway.ray.ray_internals import (
    delete_nonblocking,
    deploy_nonblocking,
    local_node_options,
    refresh_auth_config,
)
from tts_gateway.ray.replica import MAX_VOICES_PER_REPLICA, deployment_class
from tts_gateway.ray.wire import app_name, settings_values

log = logging.getLogger(__name__)


def plan_replica_cpus(replicas: Mapping[str, int], explicit: Mapping[str, float], free: float,
                      total: float) -> dict[str, float]:
    """CPUs a replica of each engine reserves, so that every replica fits in ``free`` CPUs.

    Engines in ``explicit`` keep their figure; the rest share what is left evenly, at most one CPU a
    replica (fractions are fine: Ray packs them). When even that cannot fit, a one-line
    `Unavailable` names each deployment's need and what the cluster has, instead of Serve waiting
    forever for a CPU that never frees up.
    """
    chosen = {engine: explicit[engine] for engine in replicas if engine in explicit}
    left = free - sum(replicas[e] * c for e, c in chosen.items())
    auto = [engine for engine in replicas if engine not in chosen]
    if auto:
        share = math.floor(100 * left / sum(replicas[e] for e in auto)) / 100 if left > 0 else 0.0
        for engine in auto:
            chosen[engine] = min(1.0, share)
    need = sum(replicas[e] * c for e, c in chosen.items())
    if any(c <= 0 for c in chosen.values()) or need > free + 1e-9:
        parts = ", ".join(f"{app_name(e)} {replicas[e]}×{chosen[e]:g}" for e in replicas)
        raise Unavailable(
            f"the Ray cluster cannot place the deployments: {parts} CPU need {need:g} CPUs (at least 0.01 a "
            f"replica), the cluster has {free:g} free of {total:g}; set TTS_GATEWAY_RAY_REPLICA_CPUS lower (0 shares "
            "the free CPUs out), deploy fewer engines (TTS_GATEWAY_ENGINES) or add nodes", retry_after=None)
    return chosen


def check_gpus(needs: Mapping[str, tuple[int, float]], free: float) -> None:
    """A one-line error when the replicas ask for more GPUs than the cluster has free."""
    need = sum(count * gpus for count, gpus in needs.values())
    if need > free + 1e-9:
        parts = ", ".join(f"{name} {count}×{gpus:g}" for name, (count, gpus) in needs.items() if gpus)
        raise Unavailable(f"the Ray cluster cannot place the deployments: {parts} GPU need {need:g} GPUs, the cluster "
                          f"has {free:g} free", retry_after=None)


def autoscaling(settings: Settings) -> dict[str, Any] | None:
    """Serve's ``autoscaling_config`` the settings ask for (``ray_max_replicas`` > 0), else None."""
    if settings.ray_max_replicas <= 0:
        return None
    return {"min_replicas": settings.ray_min_replicas, "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests}


def _gist(text: str) -> str:
    """The gist of a Serve message on one line: its first line, and its last (a traceback's exception)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    gist = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return gist[:400]


class ServeCluster:
    """A connection to the Ray cluster and the engines' Serve applications on it.

    Args:
        settings: Gateway settings: ``ray_address`` (empty: start a local cluster of ``ray_num_cpus``),
            ``ray_replicas`` or autoscaling, ``ray_max_ongoing_requests``, ``ray_max_queued_requests``,
            ``ray_replica_cpus``, ``ray_placement``, ``ray_start_timeout_s``, ``engine_threads``; they
            are also what the replicas build their engines from.
        overrides: Per engine: Serve deployment options (``num_replicas``, ``max_ongoing_requests``,
            ``max_queued_requests``, ...) and ``env`` (extra environment variables of its replicas).
        runtime_env: Ray runtime_env of every replica (e.g. ``{"env_vars": {"PYTHONPATH": ...}}``).
        warm: Replicas load their engine's model when they start, not at the first request.
        max_voices: Presets' latent sets a replica keeps (``@serve.multiplexed``).
    """

    def __init__(self, settings: Settings, *, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 runtime_env: Mapping[str, Any] | None = None, warm: bool = True,
                 max_voices: int = MAX_VOICES_PER_REPLICA) -> None:
        self.settings = settings
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        for engine, placement in settings.ray_placement.items():
            for key, value in placement.items():  # TTS_GATEWAY_RAY_<ENGINE>_CPUS / _GPUS
                self.overrides.setdefault(engine, {}).setdefault(key, value)
        self.autoscaling = autoscaling(settings)
        self.runtime_env = dict(runtime_env or {})
        self.warm = warm
        self.max_voices = max_voices
        self._cpus: dict[str, float] = {}  # per engine, chosen at deploy()
        self._tmp: str | None = None
        self.started_here = False  # a local cluster started by connect(), shut down by close()

    # -- the cluster --------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the cluster (or start a local one) and start Serve without its HTTP proxy."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            try:
                ray.init(**self._init_options())
            except BaseException:
                if self._tmp:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp, self.started_here = None, False
                raise
        serve.start(proxy_location="Disabled")  # Litestar is the only HTTP front door

    def _init_options(self) -> dict[str, Any]:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.settings.ray_address:
            return {"address": self.settings.ray_address, "log_to_driver": False}
        # A local cluster: nothing in the home directory (Ray writes a generated auth token to
        # ~/.ray unless one is given), sockets and logs in a temp dir, addresses on loopback.
        if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # in memory and the children's env only
            refresh_auth_config()
        self._tmp = tempfile.mkdtemp(prefix="tts-ray-")
        self.started_here = True
        return {
            "address": "local", "include_dashboard": False,
            "num_cpus": self.settings.ray_num_cpus or os.cpu_count() or 1,
            "object_store_memory": 128 * 1024 * 1024, "log_to_driver": False,
            **local_node_options("127.0.0.1", self._tmp),
        }

    def close(self) -> None:
        """Disconnect; a local cluster started here is shut down, a joined one keeps its applications."""
        import ray
        from ray import serve

        if self.started_here:
            try:
                serve.shutdown()
            except Exception:
                log.exception("serve.shutdown failed")
        ray.shutdown()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.started_here = False

    # -- the applications ---------------------------------------------------------------------------
    def deploy(self, engines: list[str]) -> dict[str, Any]:
        """A `DeploymentHandle` per engine: a joined cluster's running application is shared (redeploying
        would restart it), the others are deployed and waited for; on failure none stays behind."""
        import ray
        from ray import serve

        handles: dict[str, Any] = {}
        running = self._running_apps() if self.settings.ray_address else set()
        for engine in engines:
            name = app_name(engine)
            if name in running:
                log.info("using the running Serve application %s", name)
                handles[engine] = serve.get_app_handle(name)
        new = [engine for engine in engines if engine not in handles]
        free = ray.available_resources()
        self._cpus = plan_replica_cpus({e: self._replica_count(e) for e in new}, self._explicit_cpus(new),
                                       float(free.get("CPU", 0.0)), float(ray.cluster_resources().get("CPU", 0.0)))
        check_gpus({app_name(e): (self._replica_count(e), float(self.overrides.get(e, {}).get("num_gpus", 0) or 0))
                    for e in new}, float(free.get("GPU", 0.0)))
        deployed: list[str] = []
        try:
            for engine in new:
                name = app_name(engine)
                started = time.perf_counter()
                deploy_nonblocking(self.application(engine), name)
                deployed.append(name)
                self._wait_running(name, time.monotonic() + self.settings.ray_start_timeout_s)
                handles[engine] = serve.get_app_handle(name)
                log.info("deployed %s (%g CPU a replica) in %.1fs", name, self._cpus[engine],
                         time.perf_counter() - started)
        except BaseException:
            for name in deployed:  # nothing half-deployed stays behind, holding CPUs
                try:
                    delete_nonblocking(name)
                except Exception:
                    log.exception("could not delete %s", name)
            raise
        return handles

    def _replica_count(self, engine: str) -> int:
        """Replicas that must fit at start: the fixed count, or autoscaling's minimum (at least one)."""
        extra = self.overrides.get(engine, {})
        scaling = extra.get("autoscaling_config") or (self.autoscaling if "num_replicas" not in extra else None)
        if scaling:
            return max(1, int(scaling.get("initial_replicas") or scaling.get("min_replicas") or 1))
        return int(extra.get("num_replicas", self.settings.ray_replicas))

    def _explicit_cpus(self, engines: list[str]) -> dict[str, float]:
        """Engines whose replicas' CPUs were set (per engine, or TTS_GATEWAY_RAY_REPLICA_CPUS > 0)."""
        chosen: dict[str, float] = {}
        for engine in engines:
            given = self.overrides.get(engine, {}).get("num_cpus")
            if given is None and self.settings.ray_replica_cpus > 0:
                given = self.settings.ray_replica_cpus
            if given is not None:
                chosen[engine] = float(given)
        return chosen

    def _wait_running(self, name: str, deadline: float) -> None:
        """Until Serve says ``name`` is running; a failed deployment or the deadline is a one-line error."""
        from ray import serve

        while True:
            app = serve.status().applications.get(name)
            status = str(app.status).rsplit(".", 1)[-1] if app is not None else "NOT_STARTED"
            if status == "RUNNING":
                return
            messages = [app.message] if app is not None else []
            if app is not None:  # the deployments' messages say why (the application's only that they failed)
                messages = [d.message for d in app.deployments.values() if d.message] or messages
            message = " ".join(_gist(m) for m in messages if m)  # already one line each
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise Unavailable(f"Ray Serve could not start {name}: {status}: {message}",
                                  retry_after=None)
            if time.monotonic() > deadline:
                raise Unavailable(f"Ray Serve did not start {name} within {self.settings.ray_start_timeout_s:g} s "
                                  f"(TTS_GATEWAY_RAY_START_TIMEOUT_S); it is {status}: "
                                  f"{message or 'no message'}", retry_after=None)
            time.sleep(0.5)

    @staticmethod
    def _running_apps() -> set[str]:
        from ray import serve

        try:
            apps = serve.status().applications
        except Exception:
            return set()
        return {name for name, app in apps.items() if str(app.status).endswith("RUNNING")}

    def deployment_options(self, engine: str) -> dict[str, Any]:
        """Serve deployment options of ``engine``'s application (replicas, limits, placement, env)."""
        settings = self.settings
        extra = dict(self.overrides.get(engine, {}))
        env = {str(k): str(v) for k, v in (self.runtime_env.get("env_vars") or {}).items()}
        if settings.engine_threads > 0:
            env.setdefault("OMP_NUM_THREADS", str(settings.engine_threads))
        if os.environ.get("PYTHONPATH"):
            env.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        env.update({str(k): str(v) for k, v in (extra.pop("env", None) or {}).items()})
        runtime_env = {**self.runtime_env, "env_vars": env}
        cpus = extra.pop("num_cpus", None)
        cpus = self._cpus.get(engine, cpus if cpus is not None else (settings.ray_replica_cpus or 1.0))
        actor = {"num_cpus": cpus, "runtime_env": runtime_env}
        for key in ("num_gpus", "resources", "accelerator_type"):  # placement, as Ray's actor options name it
            if key in extra:
                actor[key] = extra.pop(key)
        replicas: dict[str, Any] = {"num_replicas": settings.ray_replicas}
        if "autoscaling_config" in extra:
            replicas = {}
        elif self.autoscaling and "num_replicas" not in extra:
            replicas = {"autoscaling_config": dict(self.autoscaling)}
        return {
            "name": app_name(engine), **replicas, "max_ongoing_requests": settings.ray_max_ongoing_requests,
            "max_queued_requests": settings.ray_max_queued_requests, "ray_actor_options": actor,
            "graceful_shutdown_timeout_s": 5, **extra,
        }

    def application(self, engine: str) -> Any:
        """``engine``'s Serve application, bound to the settings its replicas build from."""
        from ray import serve

        deployment: Any = serve.deployment(deployment_class(self.max_voices))
        deployment = deployment.options(**self.deployment_options(engine))
        return deployment.bind(engine, settings_values(self.settings), self.warm)
