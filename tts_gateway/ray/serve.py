"""The Ray Serve backend: synthesis runs on Serve replicas, Litestar stays the only HTTP front door.

Gateway side: `RayBackend` turns a `Plan` into a `SynthesisJob` (plain values only: no engine
objects, no numpy, nothing that needs the gateway's memory) and sends it to the deployment of the
plan's engine through a `DeploymentHandle`. Serve's own HTTP proxy is off.

Replica side: `EngineReplica` builds its own `EngineManager`, voice registry and
`SynthesisService` from the settings (passed as plain values), rebuilds the `Plan` and runs
`SynthesisService.run` — the code path of the local backend, so the same request and seed give
the same bytes. A preset's latents travel as (blob key, blob sha256): the replica loads and
verifies them itself through the registry, cached per replica by ``@serve.multiplexed``.

Ray is an optional extra (``pip install .[ray]``): it is imported only inside functions here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from tts_gateway.config import Settings
from tts_gateway.errors import Conflict, Invalid, TimedOut, TTSGatewayError, Unavailable

log = logging.getLogger(__name__)

APP_PREFIX = "tts-"
BUSY_RETRY_AFTER_S = 2
MAX_VOICES_PER_REPLICA = 16  # @serve.multiplexed LRU size: latent sets kept per replica
T = TypeVar("T")


def app_name(engine: str) -> str:
    """The Serve application and deployment name of an engine."""
    return f"{APP_PREFIX}{engine}"


# -- the job: what travels from the gateway to a replica --------------------------------------------
@dataclass(frozen=True)
class SynthesisJob:
    """A `Plan` as plain values. Exactly one of ``builtin``, (``latents_key``, ``latents_sha256``)
    or ``latents_blob`` names the voice; ``latents_blob`` (safetensors bytes) is only used for
    voices that are in no registry (the uploads of the old ``/synthesize`` call)."""

    engine: str
    voice_name: str
    language: str
    pieces: tuple[str, ...]
    format: str
    rate: int
    speed: float
    seed: int
    repeatable: bool
    stream: bool
    model_sha256: str | None = None
    voice_language: str | None = None
    builtin: str | None = None
    latents_key: str | None = None
    latents_sha256: str | None = None
    latents_blob: bytes | None = field(default=None, repr=False)

    @property
    def multiplexed_id(self) -> str | None:
        """The ``multiplexed_model_id`` a preset's request is routed by: its blob sha256."""
        return self.latents_sha256 if self.latents_key else None

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["pieces"] = list(self.pieces)
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SynthesisJob:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["pieces"] = tuple(values.get("pieces", ()))
        return cls(**values)


def job_from_plan(plan: Any, latents_key: Callable[[str, str], str | None] = lambda name, sha: None) -> SynthesisJob:
    """Describe ``plan`` as plain values; ``latents_key(voice name, sha256)`` finds a preset's blob key."""
    voice = plan.voice
    builtin = voice.input.builtin
    key = sha = blob = None
    if builtin is None:
        sha = voice.voice_sha256
        key = latents_key(voice.name, sha) if sha else None
        if key is None:  # not in the registry: send the latents themselves
            from tts_gateway.voices.blobs import encode

            blob = encode(voice.input.latents or {})
            sha = hashlib.sha256(blob).hexdigest()
    return SynthesisJob(
        engine=plan.engine_name, voice_name=voice.name, language=plan.language, pieces=tuple(plan.pieces),
        format=plan.fmt.name, rate=plan.rate, speed=plan.speed, seed=plan.seed, repeatable=plan.repeatable,
        stream=plan.stream, model_sha256=plan.engine.model.sha256, voice_language=voice.language,
        builtin=builtin, latents_key=key, latents_sha256=sha, latents_blob=blob,
    )


# -- settings as plain values ---------------------------------------------------------------------
_NOT_SENT = {"api_keys", "host", "port"}  # the replica serves no HTTP; keys must not travel
_PATHS = {"data_dir", "xtts_checkpoint"}


def settings_values(settings: Settings) -> dict[str, Any]:
    """The settings a replica needs, as JSON-like values."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name in _NOT_SENT:
            continue
        value = getattr(settings, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def settings_from_values(values: Mapping[str, Any]) -> Settings:
    known = {f.name for f in fields(Settings)}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name not in known:
            continue  # a newer gateway's setting this replica's code does not know
        if name in _PATHS and value is not None:
            value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    if "backend" in known:
        kwargs["backend"] = "local"  # a replica runs its engine in-process
    return Settings(**kwargs)


# -- errors across the process boundary -------------------------------------------------------------
class ReplicaError(Exception):
    """A `TTSGatewayError` raised on a replica, carried as its kind and plain values (it pickles by its
    args); `error` rebuilds the same kind on the gateway."""

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.values = values

    def __str__(self) -> str:
        return f"{self.values.get('kind')}: {self.values.get('detail')}"

    @classmethod
    def of(cls, exc: TTSGatewayError) -> ReplicaError:
        return cls(exc.to_dict())

    @property
    def error(self) -> TTSGatewayError:
        return TTSGatewayError.from_dict(self.values)


def _replica_error(exc: BaseException | None) -> ReplicaError | None:
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ReplicaError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def _translate(exc: Exception, engine: str) -> TTSGatewayError:
    """Any failure of a remote call as the error of the same kind the edges understand."""
    remote = _replica_error(exc)
    if remote is not None:
        return remote.error
    if isinstance(exc, TTSGatewayError):
        return exc
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return _busy(engine, exc)
    log.error("Ray call to engine %s failed: %s: %s", engine, type(exc).__name__, exc)
    return Unavailable(f"engine {engine!r} failed on the Ray cluster: {type(exc).__name__}", retry_after=1)


def _busy(engine: str, exc: Any) -> Unavailable:
    retry = getattr(exc, "_retry_after_s", None)
    seconds = max(1, math.ceil(retry)) if retry else BUSY_RETRY_AFTER_S
    return Unavailable(f"engine {engine!r} is busy: every replica is at its limit and the queue is full; "
                       f"retry shortly", retry_after=seconds, code="busy")


# -- replica side ------------------------------------------------------------------------------------
class LoadedVoice:
    """A preset's verified latents held by one replica; Serve's multiplexing evicts it (LRU)."""

    def __init__(self, sha256: str, latents: dict[str, Any], forget: Callable[[str], None]) -> None:
        self.sha256 = sha256
        self.latents: dict[str, Any] | None = latents
        self._forget: Callable[[str], None] | None = forget

    def __del__(self) -> None:
        # Serve calls __del__ itself on eviction, and Python calls it again at collection: idempotent.
        forget, self._forget = self.__dict__.get("_forget"), None
        self.latents = None
        if forget is not None:
            try:
                forget(self.sha256)
            except Exception as exc:  # never raise from a finaliser
                log.debug("forgetting latents %s failed: %s", self.sha256[:12], exc)


class EngineReplica:
    """One Serve replica of one engine. `deployment_class` adds the ``@serve.multiplexed`` loader."""

    def __init__(self, engine_name: str, settings: Mapping[str, Any], warm: bool = True) -> None:
        from tts_gateway.core.compose import build_core
        from tts_gateway.engines.manager import DEFAULT_PLUGINS

        values = dict(settings)
        parsed = settings_from_values(values)
        # Only this replica's engine among the built-ins; plugin modules register what they register.
        parsed = parsed.with_(engines=tuple(e for e in parsed.engines if e == engine_name and e in DEFAULT_PLUGINS))
        self.engine_name = engine_name
        self.settings = parsed
        self.core = build_core(parsed, phrase_cache=False)
        self.engines = self.core.engines
        if engine_name not in self.engines.names:
            raise ValueError(f"replica for engine {engine_name!r}: no such engine (have {self.engines.names})")
        self.registry = self.core.registry
        self.service = self.core.service
        self._keys: dict[str, str] = {}
        self._counts = {"running": 0, "completed": 0, "cancelled": 0, "failed": 0, "voice_loads": 0}
        self._loaded_voices: set[str] = set()
        self._model_sha: str | None = None
        self.reporter: Any = None
        engine = self.engines.get(engine_name)
        if warm and engine.availability()[0]:  # an unavailable engine's replica still reports why
            self.engines.ensure_loaded(engine_name)
            self._model_sha = engine.model.sha256

    # multiplexed in the Serve subclass; plain here so the class is usable (and testable) without Ray
    async def voice(self, sha256: str) -> LoadedVoice:
        return await self._load_voice(sha256)

    async def _load_voice(self, sha256: str) -> LoadedVoice:
        from tts_gateway.voices import CorruptBlob

        key = self._keys.get(sha256)
        if key is None:
            raise ReplicaError.of(Conflict(f"latents {sha256[:12]}… were asked for without their blob key"))
        try:
            latents = await asyncio.to_thread(self.registry.load_latents, key, sha256)  # verifies the sha256
        except CorruptBlob as exc:
            raise ReplicaError.of(Conflict(f"the voice's latents are broken on this node ({exc}); "
                                           "delete the voice and register it again", code="voice-broken")) from None
        self._counts["voice_loads"] += 1
        self._loaded_voices.add(sha256)

        def forget(sha: str) -> None:
            self._loaded_voices.discard(sha)
            self.registry.forget(sha)

        return LoadedVoice(sha256, latents, forget)

    async def _plan(self, raw: Mapping[str, Any]) -> Any:
        from safetensors.numpy import load as st_load

        from tts_gateway.audio import FORMATS
        from tts_gateway.core.service import Plan
        from tts_gateway.engines.base import VoiceInput
        from tts_gateway.voices.catalog import ResolvedVoice

        job = SynthesisJob.from_dict(raw)
        if job.engine != self.engine_name:
            raise Conflict(f"job for engine {job.engine!r} reached a replica of {self.engine_name!r}")
        engine = self.engines.get(job.engine)
        if self._model_sha is None:
            self._model_sha = await asyncio.to_thread(lambda: engine.model.sha256)
        if job.model_sha256 and self._model_sha and job.model_sha256 != self._model_sha:
            raise Conflict(f"engine {job.engine!r} runs model {self._model_sha[:12]}… on this replica but "
                           f"the gateway planned for {job.model_sha256[:12]}…; deploy the same model files")
        if job.builtin is not None:
            voice_input = VoiceInput(builtin=job.builtin)
        elif job.latents_blob is not None:
            if hashlib.sha256(job.latents_blob).hexdigest() != job.latents_sha256:
                raise Conflict("the voice's latents were damaged in transit")
            voice_input = VoiceInput(latents=dict(st_load(job.latents_blob)))
        elif job.latents_key and job.latents_sha256:
            self._keys[job.latents_sha256] = job.latents_key
            if job.latents_sha256 in self._loaded_voices:  # held by this replica: no registry read
                self.core.metrics.voice_cache_hits.labels(self.engine_name).inc()
            loaded = await self.voice(job.latents_sha256)
            voice_input = VoiceInput(latents=loaded.latents)
        else:
            raise Conflict("the job names no voice")
        fmt = FORMATS.get(job.format)
        if fmt is None:
            raise Invalid(f"format: {job.format!r} is unknown", field="format")
        voice = ResolvedVoice(job.voice_name, job.engine, voice_input, job.voice_language, job.latents_sha256,
                              builtin=job.builtin is not None)
        return Plan(
            engine_name=job.engine, engine=engine, voice=voice, language=job.language, pieces=list(job.pieces),
            fmt=fmt, rate=job.rate, speed=job.speed, seed=job.seed, repeatable=job.repeatable, stream=job.stream,
            text=" ".join(job.pieces), cache=False,
        )

    async def synthesize(self, job: Mapping[str, Any]) -> bytes:
        """The whole result at once."""
        return b"".join([chunk async for chunk in self.stream(job)])

    async def stream(self, job: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """Encoded bytes as they are ready; a cancelled request (client gone) stops the engine."""
        from tts_gateway.core.runner import DONE, ThreadStream
        from tts_gateway.engines.base import SynthesisCancelled

        try:
            plan = await self._plan(job)
        except TTSGatewayError as exc:
            raise ReplicaError.of(exc) from None
        cancel = threading.Event()
        self._counts["running"] += 1
        outcome = "cancelled"
        stream = ThreadStream(lambda: self.service.run(plan, cancel), cancel)
        try:
            while True:
                try:
                    item = await stream.next()
                except SynthesisCancelled:
                    return
                except TTSGatewayError as exc:
                    outcome = "failed"
                    raise ReplicaError.of(exc) from None
                except Exception as exc:
                    outcome = "failed"
                    raise ReplicaError.of(Unavailable(f"engine {self.engine_name!r} failed: {type(exc).__name__}",
                                                      retry_after=1)) from None
                if item is DONE:
                    outcome = "completed"
                    return
                yield item
        finally:
            cancel.set()
            self._counts["running"] -= 1
            self._counts[outcome] += 1

    # -- what the gateway asks of a replica besides synthesis ----------------------------------------
    async def _latents_blob(self, check: Callable[[Any], None], compute: Callable[[Any], Mapping[str, Any]]) -> bytes:
        """``compute(engine)`` on this replica's loaded engine, in a thread, once ``check(engine)`` passed on
        the available engine; the latents as blob bytes (`voices.blobs.encode`)."""
        from tts_gateway.voices.blobs import encode

        def run() -> Mapping[str, Any]:
            with self.engines.use(self.engine_name) as engine:
                return compute(engine)

        try:
            check(self.engines.check_available(self.engine_name))
            return encode(await asyncio.to_thread(run))
        except TTSGatewayError as exc:
            raise ReplicaError.of(exc) from None

    async def condition(self, audio: bytes, rate: int) -> bytes:
        """Latents (safetensors bytes) for reference audio: float32 mono samples at ``rate``."""
        import numpy as np

        def check(engine: Any) -> None:
            wanted = getattr(engine, "reference_sample_rate", None)
            if wanted is None:
                raise Conflict(f"engine {self.engine_name!r} cannot clone voices")
            if int(wanted) != int(rate):
                raise Conflict(f"reference audio at {rate} Hz reached a replica that wants {wanted} Hz")

        samples = np.frombuffer(audio, dtype=np.float32)
        blob = await self._latents_blob(check, lambda engine: engine.compute_latents(samples))
        self.core.metrics.conditioning.labels(self.engine_name).inc()
        return blob

    async def blend(self, weights: dict[str, float]) -> bytes:
        """A blended voice's latents (safetensors bytes) from weighted built-in voices."""

        def check(engine: Any) -> None:
            if getattr(engine, "blend_latents", None) is None:
                raise Conflict(f"engine {self.engine_name!r} cannot blend voices")

        return await self._latents_blob(check, lambda engine: engine.blend_latents(dict(weights)))

    def state(self) -> dict[str, Any]:
        """What this replica reports to the board at each beat (cheap: no model access)."""
        import psutil

        return {"engine": self.engine_name, "loaded": self.engines.get(self.engine_name).loaded,
                "rss": psutil.Process().memory_info().rss, "voices": len(self._loaded_voices), **self._counts}

    def description(self) -> dict[str, Any]:
        from tts_gateway.ray.board import describe

        return describe(self.engines.get(self.engine_name))

    def metrics_text(self) -> str:
        metrics = self.core.metrics
        metrics.engine_loaded.labels(self.engine_name).set(1 if self.engines.get(self.engine_name).loaded else 0)
        return metrics.render().decode()

    def carry_out(self, action: str) -> str:
        """A load/unload order from the gateway: ``ok``, or ``refused`` while a synthesis uses the model."""
        if action == "load":
            self.engines.ensure_loaded(self.engine_name)
            return "ok"
        if action == "unload":
            return "ok" if self.engines.unload(self.engine_name) else "refused"
        raise ValueError(f"unknown order {action!r}")

    def start_reporting(self, replica: str) -> None:
        """Report to the cluster's board (Serve replicas only) and unload idle models on this replica."""
        from tts_gateway.ray.board import Reporter

        self.reporter = Reporter(replica, self.state, self.description, self.metrics_text, self.carry_out)
        self.reporter.start()
        self.engines.start_reaper()

    def stop_reporting(self) -> None:
        reporter, self.reporter = self.reporter, None
        if reporter is not None:
            reporter.stop()

    async def stats(self) -> dict[str, Any]:
        """This replica's process, memory and counters (benchmarks and tests read it)."""
        return {**self.state(), "pid": os.getpid(), "voices": sorted(self._loaded_voices)}


_CLASSES: dict[int, type] = {}


def deployment_class(max_voices: int = MAX_VOICES_PER_REPLICA) -> type:
    """`EngineReplica` with its voice loader wrapped in ``@serve.multiplexed`` (needs Ray)."""
    if max_voices not in _CLASSES:
        from ray import serve

        class TTSEngine(EngineReplica):
            def __init__(self, engine_name: str, settings: Mapping[str, Any], warm: bool = True) -> None:
                super().__init__(engine_name, settings, warm)
                self.start_reporting(serve.get_replica_context().replica_id.unique_id)

            def __del__(self) -> None:  # Serve calls it when the replica stops: leave the board at once
                self.stop_reporting()

            @serve.multiplexed(max_num_models_per_replica=max_voices)
            async def voice(self, sha256: str) -> LoadedVoice:
                return await self._load_voice(sha256)

        _CLASSES[max_voices] = TTSEngine
    return _CLASSES[max_voices]


# -- gateway side ------------------------------------------------------------------------------------
def _setting(settings: Settings, name: str, default: Any) -> Any:
    value = getattr(settings, name, None)
    return default if value is None else value


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


def _gist(text: str) -> str:
    """The gist of a Serve message on one line: its first line, and its last (a traceback's exception)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    gist = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return gist[:400]


class RayBackend:
    """Calls the engines' Serve deployments; see the module docstring.

    Args:
        settings: Gateway settings. ``ray_address`` (empty: start a local cluster), ``ray_replicas``,
            ``ray_max_ongoing_requests``, ``ray_max_queued_requests``, ``ray_replica_cpus`` and
            ``ray_num_cpus`` are read when present; the keyword arguments of the same names win.
        registry: The gateway's voice registry (finds a preset's blob key).
        engines: Engines to deploy; default: every engine of ``settings``, found by an `EngineManager`.
        overrides: Per engine: Serve deployment options (``num_replicas``, ``max_ongoing_requests``,
            ``max_queued_requests``, ...) and ``env`` (extra environment variables of its replicas).
        runtime_env: Ray runtime_env of every replica (e.g. ``{"env_vars": {"PYTHONPATH": ...}}``).
        warm: Replicas load their engine's model when they start, not at the first request.
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
        address: str | None = None,
        replicas: int | None = None,
        max_ongoing_requests: int | None = None,
        max_queued_requests: int | None = None,
        replica_cpus: float | None = None,
        num_cpus: int | None = None,
    ) -> None:
        def pick(given: Any, name: str, default: Any) -> Any:
            return given if given is not None else _setting(settings, name, default)

        self.settings = settings
        self.registry = registry
        self.address: str = pick(address, "ray_address", "") or ""
        self.replicas: int = pick(replicas, "ray_replicas", 1)
        self.max_ongoing: int = pick(max_ongoing_requests, "ray_max_ongoing_requests", 2)
        self.max_queued: int = pick(max_queued_requests, "ray_max_queued_requests", 16)
        self.replica_cpus: float = pick(replica_cpus, "ray_replica_cpus", 0.0)  # 0: share the free CPUs out
        self.start_timeout_s: float = float(pick(None, "ray_start_timeout_s", 600.0))
        self._cpus: dict[str, float] = {}  # per engine, chosen at start()
        self.num_cpus: int | None = pick(num_cpus, "ray_num_cpus", 0) or None
        self.timeout_s = settings.timeout_s
        self._engines = engines
        self.overrides = {k: dict(v) for k, v in (overrides or {}).items()}
        for engine, placement in (_setting(settings, "ray_placement", {}) or {}).items():
            for key, value in placement.items():  # TTS_GATEWAY_RAY_<ENGINE>_CPUS / _GPUS
                self.overrides.setdefault(engine, {}).setdefault(key, value)
        self.autoscaling: dict[str, Any] | None = None
        if (_setting(settings, "ray_max_replicas", 0) or 0) > 0:
            self.autoscaling = {"min_replicas": _setting(settings, "ray_min_replicas", 1),
                                "max_replicas": _setting(settings, "ray_max_replicas", 0),
                                "target_ongoing_requests": _setting(settings, "ray_target_ongoing_requests", 2.0)}
        self.runtime_env = dict(runtime_env or {})
        self.warm = warm
        self.max_voices = max_voices
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, str] = {}  # latents sha256 → blob key (a key never changes for a sha)
        self._tmp: str | None = None
        self._started_cluster = False
        self.started = False
        self.view: Any = None  # the `ClusterView` of the replicas' board, from start()

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
        from tts_gateway.ray.engines import RemotePlugin, remote_engine

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
        import ray
        from ray import serve

        if not ray.is_initialized():
            try:
                ray.init(**self._init_options())
            except BaseException:
                if self._tmp:
                    shutil.rmtree(self._tmp, ignore_errors=True)
                    self._tmp, self._started_cluster = None, False
                raise
        serve.start(proxy_location="Disabled")  # Litestar is the only HTTP front door
        from tts_gateway.ray.board import ClusterView, board_handle

        self.view = ClusterView(board_handle(create=True))  # before the replicas, which report to it
        running = self._running_apps() if self.address else set()
        for engine in self.engines:
            name = app_name(engine)
            if name in running:  # another gateway deployed it: share it, do not redeploy (it would restart)
                log.info("using the running Serve application %s", name)
                self._handles[engine] = serve.get_app_handle(name)
        new = [engine for engine in self.engines if engine not in self._handles]
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
                serve._run(self._application(engine), _blocking=False, name=name, route_prefix=None)
                deployed.append(name)
                self._wait_running(name, time.monotonic() + self.start_timeout_s)
                self._handles[engine] = serve.get_app_handle(name)
                log.info("deployed %s (%g CPU a replica) in %.1fs", name, self._cpus[engine],
                         time.perf_counter() - started)
        except BaseException:
            for name in deployed:  # nothing half-deployed stays behind, holding CPUs
                try:
                    serve.delete(name, _blocking=False)
                except Exception:
                    log.exception("could not delete %s", name)
            self._handles.clear()
            raise
        self.view.start()
        # The gateway plans with what replicas report: have every engine's description before serving.
        deadline = time.monotonic() + self.start_timeout_s
        missing = lambda: [e for e in self.engines if self.view.description(e) is None]  # noqa: E731
        if not self.view.wait(lambda: not missing(), max(0.0, deadline - time.monotonic())):
            log.warning("no report yet from the replicas of %s; they are listed unavailable until one arrives",
                        ", ".join(missing()))
        self.started = True

    def _replica_count(self, engine: str) -> int:
        """Replicas that must fit at start: the fixed count, or autoscaling's minimum (at least one)."""
        extra = self.overrides.get(engine, {})
        scaling = extra.get("autoscaling_config") or (self.autoscaling if "num_replicas" not in extra else None)
        if scaling:
            return max(1, int(scaling.get("initial_replicas") or scaling.get("min_replicas") or 1))
        return int(extra.get("num_replicas", self.replicas))

    def _explicit_cpus(self, engines: list[str]) -> dict[str, float]:
        """Engines whose replicas' CPUs were set (per engine, or TTS_GATEWAY_RAY_REPLICA_CPUS > 0)."""
        chosen: dict[str, float] = {}
        for engine in engines:
            given = self.overrides.get(engine, {}).get("num_cpus")
            if given is None and self.replica_cpus > 0:
                given = self.replica_cpus
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
                raise Unavailable(f"Ray Serve did not start {name} within {self.start_timeout_s:g} s "
                                  f"(TTS_GATEWAY_RAY_START_TIMEOUT_S); it is {status}: "
                                  f"{message or 'no message'}", retry_after=None)
            time.sleep(0.5)

    def _init_options(self) -> dict[str, Any]:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address:
            return {"address": self.address, "log_to_driver": False}
        # A local cluster: nothing in the home directory (Ray writes a generated auth token to
        # ~/.ray unless one is given), sockets and logs in a temp dir, addresses on loopback.
        if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # in memory and the children's env only
            try:  # Ray caches its config at import: make this process see token mode and the token
                from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

                Config.initialize("")
                AuthenticationTokenLoader.instance().reset_cache()
            except (ImportError, AttributeError) as exc:
                log.warning("could not refresh Ray's auth config (%s); import ray after start()", exc)
        self._tmp = tempfile.mkdtemp(prefix="tts-ray-", dir=_setting(self.settings, "ray_tmpdir", None))
        self._started_cluster = True
        return {
            "address": "local", "include_dashboard": False, "num_cpus": self.num_cpus or os.cpu_count() or 1,
            "object_store_memory": 128 * 1024 * 1024, "_node_ip_address": "127.0.0.1", "_temp_dir": self._tmp,
            "log_to_driver": False,
        }

    @staticmethod
    def _running_apps() -> set[str]:
        from ray import serve

        try:
            apps = serve.status().applications
        except Exception:
            return set()
        return {name for name, app in apps.items() if str(app.status).endswith("RUNNING")}

    def deployment_options(self, engine: str) -> dict[str, Any]:
        extra = dict(self.overrides.get(engine, {}))
        env = {str(k): str(v) for k, v in (self.runtime_env.get("env_vars") or {}).items()}
        if self.settings.engine_threads > 0:
            env.setdefault("OMP_NUM_THREADS", str(self.settings.engine_threads))
        if os.environ.get("PYTHONPATH"):
            env.setdefault("PYTHONPATH", os.environ["PYTHONPATH"])
        env.update({str(k): str(v) for k, v in (extra.pop("env", None) or {}).items()})
        runtime_env = {**self.runtime_env, "env_vars": env}
        cpus = extra.pop("num_cpus", None)
        cpus = self._cpus.get(engine, cpus if cpus is not None else (self.replica_cpus or 1.0))
        actor = {"num_cpus": cpus, "runtime_env": runtime_env}
        for key in ("num_gpus", "resources", "accelerator_type"):  # placement, as Ray's actor options name it
            if key in extra:
                actor[key] = extra.pop(key)
        replicas: dict[str, Any] = {"num_replicas": self.replicas}
        if "autoscaling_config" in extra:
            replicas = {}
        elif self.autoscaling and "num_replicas" not in extra:
            replicas = {"autoscaling_config": dict(self.autoscaling)}
        return {
            "name": app_name(engine), **replicas, "max_ongoing_requests": self.max_ongoing,
            "max_queued_requests": self.max_queued, "ray_actor_options": actor,
            "graceful_shutdown_timeout_s": 5, **extra,
        }

    def _application(self, engine: str) -> Any:
        from ray import serve

        deployment: Any = serve.deployment(deployment_class(self.max_voices))
        deployment = deployment.options(**self.deployment_options(engine))
        return deployment.bind(engine, settings_values(self.settings), self.warm)

    def close(self) -> None:
        """Disconnect; a local cluster started here is shut down, a joined one keeps its applications."""
        if not self.started and not self._started_cluster:
            return
        import ray
        from ray import serve

        self._handles.clear()
        self.started = False
        if self.view is not None:
            self.view.close()
            self.view = None
        if self._started_cluster:
            try:
                serve.shutdown()
            except Exception:
                log.exception("serve.shutdown failed")
        ray.shutdown()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._started_cluster = False

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
        from ray.serve.exceptions import BackPressureError

        job = await asyncio.to_thread(self.job, plan) if self._needs_lookup(plan) else self.job(plan)
        response = self._handle(job, stream=False).synthesize.remote(job.to_dict())
        try:
            return await asyncio.wait_for(_awaitable(response), self.timeout_s)
        except BackPressureError as exc:  # rejected before it ran: nothing to cancel
            raise _busy(job.engine, exc) from None
        except TimeoutError:
            _cancel(response)
            raise TimedOut(f"synthesis took longer than {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            _cancel(response)  # the client went away
            raise
        except Exception as exc:
            raise _translate(exc, job.engine) from None

    async def open_stream(self, plan: Any, on_complete: Callable[[], None] | None = None,
                          ) -> tuple[bytes, _RemoteChunks]:
        """The first chunk (awaited, so early errors keep their status) and an iterator over the rest.

        ``on_complete`` runs only when the replica finished normally. Leaving the iterator early
        (client disconnect) cancels the replica's work.
        """
        from ray.serve.exceptions import BackPressureError

        job = await asyncio.to_thread(self.job, plan) if self._needs_lookup(plan) else self.job(plan)
        generator = self._handle(job, stream=True).stream.remote(job.to_dict())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s

        async def next_chunk() -> bytes:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(_anext(generator), remaining)

        finished = False
        try:
            first = await next_chunk()
        except StopAsyncIteration:
            finished, first = True, b""
            if on_complete is not None:
                on_complete()
        except BackPressureError as exc:  # rejected before its first chunk: never cancel it
            raise _busy(job.engine, exc) from None
        except TimeoutError:
            _cancel(generator)
            raise TimedOut(f"no audio within {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except asyncio.CancelledError:
            _cancel(generator)
            raise
        except Exception as exc:
            raise _translate(exc, job.engine) from None

        return first, _RemoteChunks(generator, next_chunk, finished, on_complete, job.engine, self.timeout_s)

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
            _cancel(response)
            raise TimedOut(f"engine {engine!r} took longer than {self.timeout_s:g} s (TTS_GATEWAY_TIMEOUT_S)") from None
        except Exception as exc:
            raise _translate(exc, engine) from None

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

        timeout = self.start_timeout_s if action == "load" else self.timeout_s
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


class _RemoteChunks:
    """The rest of a stream. ``aclose()`` — even before the first ``__anext__``, when an async
    generator's ``finally`` would never run — cancels the replica's work unless the stream ended."""

    def __init__(self, generator: Any, next_chunk: Callable[[], Any], finished: bool,
                 on_complete: Callable[[], None] | None, engine: str, timeout_s: float) -> None:
        self._generator = generator
        self._next = next_chunk
        self._done = finished
        self._on_complete = on_complete
        self._engine = engine
        self._timeout_s = timeout_s

    def __aiter__(self) -> _RemoteChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            return await self._next()
        except StopAsyncIteration:
            self._done = True
            if self._on_complete is not None:
                self._on_complete()
            raise
        except TimeoutError:  # headers are sent: end the stream early; the log says why
            log.error("stream ended early: no audio within %g s", self._timeout_s)
            await self.aclose()
            raise StopAsyncIteration from None
        except asyncio.CancelledError:
            await self.aclose()
            raise
        except Exception as exc:
            log.error("stream ended early: %s", _translate(exc, self._engine))
            self._done = True  # it failed on the replica: nothing left to cancel
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            _cancel(self._generator)  # client disconnect, timeout: stop the replica

    def __del__(self) -> None:
        if not self.__dict__.get("_done", True):
            self._done = True
            _cancel(self._generator)


async def _awaitable(response: Any) -> Any:
    return await response


async def _anext(generator: Any) -> Any:
    return await generator.__anext__()


def _cancel(response: Any) -> None:
    """Best-effort cancel of a Serve response or response generator (never raises)."""
    try:
        response.cancel()
    except Exception as exc:
        log.debug("cancel failed: %s", exc)
