"""The replica side: one Ray Serve replica of one engine runs the local backend's code path.

`EngineReplica` builds its own `EngineManager`, voice registry and `SynthesisService` from the
settings (sent as plain values), rebuilds the `Plan` from a `SynthesisJob` and runs
`SynthesisService.run`, so the same request and seed give the same bytes as the local backend. A
preset's latents are loaded and verified through the registry, cached per replica by
``@serve.multiplexed`` (`deployment_class`). Ray is imported only inside functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from tts_gateway.engines.base import BlendingEngine, CloningEngine
from tts_gateway.errors import Conflict, Invalid, TTSGatewayError, Unavailable
from tts_gateway.ray.wire import (
    ReplicaError,
    SynthesisJob,
    settings_from_values,
    timed_values,
    word_map_from_values,
)

if TYPE_CHECKING:
    from tts_gateway.core.timings import TimedBytes

log = logging.getLogger(__name__)

MAX_VOICES_PER_REPLICA = 16  # @serve.multiplexed LRU size: latent sets kept per replica


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
            text=" ".join(job.pieces), cache=False, pauses=list(job.pauses), rates=list(job.rates),
            languages=list(job.languages), end_pause=job.end_pause, timestamps=job.timestamps,
            words=None if job.words is None else word_map_from_values(job.words),
        )

    async def synthesize(self, job: Mapping[str, Any]) -> bytes:
        """The whole result at once."""
        return b"".join([item.audio async for item in self._items(job)])

    async def stream(self, job: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """Encoded bytes as they are ready; a cancelled request (client gone) stops the engine."""
        async for item in self._items(job):
            if item.audio:
                yield item.audio

    async def synthesize_timed(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A timed job's whole result: its parts with their timings, as plain values (`wire.timed_values`)."""
        return [timed_values(item) async for item in self._items(job)]

    async def stream_timed(self, job: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A timed job's parts as they are ready, each with the timings of what it holds."""
        async for item in self._items(job):
            yield timed_values(item)

    async def _items(self, job: Mapping[str, Any]) -> AsyncIterator[TimedBytes]:
        """The local backend's `SynthesisService.run_timed` on this replica; a cancelled request (client
        gone) stops the engine, errors travel as `ReplicaError`s."""
        from tts_gateway.core.runner import DONE, ThreadStream
        from tts_gateway.engines.base import SynthesisCancelled

        try:
            plan = await self._plan(job)
        except TTSGatewayError as exc:
            raise ReplicaError.of(exc) from None
        cancel = threading.Event()
        self._counts["running"] += 1
        outcome = "cancelled"
        stream = ThreadStream(lambda: self.service.run_timed(plan, cancel), cancel)
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
            if not isinstance(engine, CloningEngine):
                raise Conflict(f"engine {self.engine_name!r} cannot clone voices")
            wanted = engine.reference_sample_rate
            if int(wanted) != int(rate):
                raise Conflict(f"reference audio at {rate} Hz reached a replica that wants {wanted} Hz")

        samples = np.frombuffer(audio, dtype=np.float32)
        blob = await self._latents_blob(check, lambda engine: engine.compute_latents(samples))
        self.core.metrics.conditioning.labels(self.engine_name).inc()
        return blob

    async def blend(self, weights: dict[str, float]) -> bytes:
        """A blended voice's latents (safetensors bytes) from weighted built-in voices."""

        def check(engine: Any) -> None:
            if not isinstance(engine, BlendingEngine):
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

        from tts_gateway.ray.ray_internals import replica_id

        class TTSEngine(EngineReplica):
            def __init__(self, engine_name: str, settings: Mapping[str, Any], warm: bool = True) -> None:
                super().__init__(engine_name, settings, warm)
                self.start_reporting(replica_id())

            def __del__(self) -> None:  # Serve calls it when the replica stops: leave the board at once
                self.stop_reporting()

            @serve.multiplexed(max_num_models_per_replica=max_voices)
            async def voice(self, sha256: str) -> LoadedVoice:
                return await self._load_voice(sha256)

        _CLASSES[max_voices] = TTSEngine
    return _CLASSES[max_voices]
