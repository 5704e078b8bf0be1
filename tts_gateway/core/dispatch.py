"""The front door every edge shares: phrase cache, then the runner, with admission and timeouts.

HTTP and Wyoming both turn a request into a `Plan` and hand it to `Dispatcher.run`, which answers
from the phrase cache when it can and otherwise runs the plan on the runner (local worker threads
or Ray Serve), streaming when the plan streams. Readiness (default engine loaded, canary passed)
lives here too, so every edge reports the same state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tts_gateway.core.compose import Core
from tts_gateway.core.phrase_cache import PhraseCache
from tts_gateway.core.runner import Admission, HealthReportingRunner, LocalRunner, Runner, Worker
from tts_gateway.core.service import Plan, SynthesisRequest
from tts_gateway.core.timings import TimedBytes, Timings
from tts_gateway.engines.base import BatchingEngine
from tts_gateway.errors import TTSGatewayError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Outcome:
    """A synthesis result: the whole ``audio``, or ``first`` + ``rest`` when it streams."""

    headers: dict[str, str]
    media_type: str
    cache: str  # "hit" or "miss"
    audio: bytes | None = None
    first: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    # Headers are sent before a stream ends, so an engine failure or timeout after the first chunk cannot
    # change the status: the stream just stops. This says whether it reached the end (known once closed).
    complete: bool = True

    async def chunks(self, size: int = 32768) -> AsyncIterator[bytes]:
        """Every byte of the result as it becomes available."""
        if self.audio is not None:
            for start in range(0, len(self.audio), size):
                yield self.audio[start : start + size]
            return
        try:
            if self.first:
                yield self.first
            if self.rest is not None:
                async for chunk in self.rest:
                    yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the work behind a stream the consumer left early (a client that went away)."""
        rest, self.rest = self.rest, None
        self.complete = bool(getattr(rest, "complete", self.complete))
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            await closer()


@dataclass
class TimedOutcome:
    """A timed result: the whole ``audio`` with its ``timings``, or ``first`` + ``rest`` (`TimedBytes`)."""

    headers: dict[str, str]
    cache: str  # "hit" or "miss"
    audio: bytes | None = None
    timings: Timings | None = None
    first: TimedBytes | None = None
    rest: AsyncIterator[TimedBytes] | None = None

    async def items(self) -> AsyncIterator[TimedBytes]:
        """Every part of the result as it becomes available (a whole result is one part)."""
        if self.audio is not None and self.timings is not None:
            yield TimedBytes(self.audio, tuple(self.timings.words), tuple(self.timings.sentences),
                             self.timings.duration)
            return
        try:
            if self.first is not None:
                yield self.first
            if self.rest is not None:
                async for item in self.rest:
                    yield item
        finally:
            rest, self.rest = self.rest, None
            closer = getattr(rest, "aclose", None)
            if closer is not None:
                await closer()


@dataclass
class Readiness:
    ready: bool = False
    detail: str = "starting: the default engine is loading"
    engine: str | None = None  # the default voice's engine, once the warm-up found it
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class _Collecting:
    """The rest of a stream, remembered for the phrase cache. ``aclose()`` stops the work even when
    iteration never started (an async generator's ``finally`` would not run then). The stream ends
    only once the cache holds it, so a client that asks again as soon as its answer is over hits."""

    def __init__(self, store: Callable[[list[Any]], Awaitable[None]] | None) -> None:
        self._store = store  # writes what was collected to the cache; None: the plan is never cached
        self._rest: AsyncIterator[Any] | None = None
        self.collected: list[Any] = []
        self.complete = False

    def completed(self) -> None:
        """The runner's ``on_complete``: the synthesis finished normally (called before the end is seen)."""
        self.complete = True

    def follow(self, first: Any, rest: AsyncIterator[Any]) -> _Collecting:
        if first:
            self.collected.append(first)
        self._rest = rest
        return self

    def __aiter__(self) -> _Collecting:
        return self

    async def __anext__(self) -> Any:
        assert self._rest is not None, "follow() comes first"
        try:
            chunk = await self._rest.__anext__()
        except StopAsyncIteration:
            if self.complete and self._store is not None:
                try:
                    await self._store(self.collected)
                except Exception:  # the client has all its audio; only the cache misses it
                    log.exception("phrase cache write failed")
            raise
        self.collected.append(chunk)
        return chunk

    async def aclose(self) -> None:
        closer = getattr(self._rest, "aclose", None)
        if closer is not None:
            await closer()  # the runner's stream sets the request's cancel event: the worker stops


class Dispatcher:
    """Runs plans for the edges. Built once per server process around one `Core`.

    Args:
        core: Engines, voices, service, metrics and the phrase cache.
        runner: Where plans run; a `LocalRunner` over this process's worker threads by default.
    """

    def __init__(self, core: Core, runner: Runner | None = None) -> None:
        settings = core.settings
        self.core = core
        self.admission = Admission(settings.max_concurrency, settings.max_queue, core.metrics)
        # A thread per slot, per call that lent its slot to a batching engine's seat, and a few for calls
        # that timed out but have not stopped yet (their slot is freed only then).
        engines = [core.engines.get(name) for name in core.engines.names]
        seats = sum(engine.max_batch for engine in engines if isinstance(engine, BatchingEngine))
        self.worker = Worker(threads=settings.max_concurrency + seats + 4, timeout_s=settings.timeout_s)
        self.runner: Runner = runner or LocalRunner(core.service, self.admission, self.worker)
        self.readiness = Readiness()

    @property
    def cache(self) -> PhraseCache | None:
        return self.core.cache

    def _cache_for(self, plan: Plan) -> tuple[PhraseCache | None, str | None]:
        """The phrase cache when it is on, and the plan's key in it (None: the plan is never cached)."""
        cache = self.cache if self.cache is not None and self.cache.enabled else None
        parts = plan.cache_parts() if cache is not None else None
        return cache, PhraseCache.key(parts) if parts is not None else None

    async def run(self, plan: Plan) -> Outcome:
        """The phrase cache, then the runner; raises `TTSGatewayError` kinds before any audio exists."""
        headers = plan.headers()
        cache, key = self._cache_for(plan)
        if cache is not None and key is not None:
            hit = await asyncio.to_thread(cache.get, key)
            if hit is not None:
                headers["X-Cache"] = "hit"
                return Outcome(headers, hit.media_type, "hit", audio=hit.audio)
        headers["X-Cache"] = "miss"
        if not plan.streams:
            audio = await self.runner.call(plan)
            if cache is not None and key is not None:
                await asyncio.to_thread(cache.put, key, audio, plan.media_type, plan.headers())
            return Outcome(headers, plan.media_type, "miss", audio=audio)

        async def store(chunks: list[bytes]) -> None:
            assert cache is not None and key is not None
            await asyncio.to_thread(cache.put, key, b"".join(chunks), plan.media_type, plan.headers())

        rest = _Collecting(store if key is not None else None)
        first, chunks = await self.runner.open_stream(plan, on_complete=rest.completed)
        return Outcome(headers, plan.media_type, "miss", first=first, rest=rest.follow(first, chunks), complete=False)

    async def run_timed(self, plan: Plan) -> TimedOutcome:
        """Like `run`, for a plan with timestamps: the audio with its timings, whole or as `TimedBytes`."""
        headers = plan.headers()
        cache, key = self._cache_for(plan)
        if cache is not None and key is not None:
            hit = await asyncio.to_thread(cache.get, key)
            if hit is not None and hit.timings is not None:
                headers["X-Cache"] = "hit"
                return TimedOutcome(headers, "hit", audio=hit.audio, timings=Timings.from_dict(hit.timings))
        headers["X-Cache"] = "miss"
        if not plan.stream:
            audio, timings = await self.runner.call_timed(plan)
            if cache is not None and key is not None:
                await asyncio.to_thread(cache.put, key, audio, plan.media_type, plan.headers(), timings.as_dict(True))
            return TimedOutcome(headers, "miss", audio=audio, timings=timings)

        async def store(items: list[TimedBytes]) -> None:
            assert cache is not None and key is not None
            await asyncio.to_thread(cache.put, key, b"".join(item.audio for item in items), plan.media_type,
                                    plan.headers(), Timings.of(items).as_dict(True))

        rest = _Collecting(store if key is not None else None)
        first, items = await self.runner.open_timed_stream(plan, on_complete=rest.completed)
        return TimedOutcome(headers, "miss", first=first or None, rest=rest.follow(first, items))

    async def blocking(self, fn: Callable[[], T]) -> T:
        """A blocking call (registration, conditioning) under admission control."""
        return await self.runner.run_blocking(fn)

    async def warm_up(self) -> None:
        """Load the default engine and run a canary synthesis; `readiness` reports the outcome."""
        core, readiness = self.core, self.readiness
        default = core.settings.default_voice
        try:
            plan = await asyncio.to_thread(core.service.plan, SynthesisRequest(text="Ready.", voice=default, seed=1))
            if not isinstance(self.runner, LocalRunner):  # the engines run elsewhere (Ray replicas)
                if core.settings.canary and len(await self.runner.call(plan)) <= 44:
                    raise RuntimeError("canary synthesis returned no audio")
                readiness.detail = f"default voice {default} served remotely; canary passed"
                readiness.engine = plan.engine_name
                readiness.ready = True
                return
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.worker.pool, core.engines.ensure_loaded, plan.engine_name)
            core.metrics.engine_loaded.labels(plan.engine_name).set(1)
            # The canary counts against MAX_CONCURRENCY and TIMEOUT_S like any synthesis.
            if core.settings.canary and len(await self.runner.call(plan)) <= 44:
                raise RuntimeError("canary synthesis returned no audio")
            readiness.detail = f"default voice {default}: canary passed"
            readiness.engine = plan.engine_name
            readiness.ready = True
        except TTSGatewayError as exc:
            readiness.detail = f"default voice {default} is not usable: {exc.detail}"
            log.error("not ready: %s", readiness.detail)
        except Exception as exc:
            readiness.detail = f"default voice {default} failed its canary: {exc}"
            log.exception("not ready")

    def check_ready(self) -> tuple[bool, str]:
        """(ready, detail). Ready: the default voice can be served now — its canary passed at start and its
        engine is available (loaded, or loaded again by the next request after an unload) — and the voice
        registry can be read. The detail says which part is not, and where each engine stands."""
        availability = self.availability()
        engines = "; ".join(f"{name} {state}" for name, state in self.engine_states(availability).items())
        if not self.readiness.ready:
            return False, f"{self.readiness.detail}; engines: {engines}"
        name = self.readiness.engine
        default = self.core.settings.default_voice
        if name is not None and name in availability:
            ok, reason = availability[name]
            if not ok:
                return False, f"default voice {default}: engine {name} is unavailable now: {reason}"
            if not self.core.engines.get(name).loaded:
                detail = (f"default voice {default}: engine {name} is not loaded (unloaded; the next request "
                          f"loads it again); canary passed at start")
            else:
                detail = f"{self.readiness.detail}; engine {name} loaded"
        else:
            detail = self.readiness.detail
        problem = self.core.registry.health()
        if problem is not None:
            return False, problem
        problem = self.runner.health() if isinstance(self.runner, HealthReportingRunner) else None
        if problem is not None:
            return False, problem
        return True, f"{detail}; engines: {engines}"

    def availability(self) -> dict[str, tuple[bool, str | None]]:
        """Each engine's (ok, reason), read once; a plugin's failing check reads as unavailable."""
        found: dict[str, tuple[bool, str | None]] = {}
        for name in self.core.engines.names:
            try:
                found[name] = self.core.engines.get(name).availability()
            except Exception as exc:  # a plugin's check must not break the start or readiness
                found[name] = (False, f"availability check failed: {exc}")
        return found

    def engine_states(self, availability: dict[str, tuple[bool, str | None]]) -> dict[str, str]:
        """Each engine as one phrase: loaded, available, or unavailable with the reason (and its retry time)."""
        states = {}
        for name, (ok, reason) in availability.items():
            state = ("loaded" if self.core.engines.get(name).loaded else "available") if ok else "unavailable"
            states[name] = f"{state} ({reason})" if reason else state
        return states

    def summary(self) -> list[str]:
        """What an operator wants to see at start: where things are, which engines work (or why not)."""
        settings = self.core.settings
        base = f"http://{settings.host}:{settings.port}"
        lines = [f"tts-gateway on {base} (playground {base}/, API docs {base}/docs)",
                 f"data dir {settings.data_dir}; default voice {settings.default_voice}"]
        for name, (ok, reason) in self.availability().items():
            lines.append(f"engine {name}: " + ("available" if ok else f"unavailable: {reason}"))
        for variable, nearest in settings.unknown_variables:
            hint = f"; did you mean {nearest}?" if nearest else ""
            lines.append(f"warning: {variable} is not a setting and is ignored{hint}")
        for variable in self.core.engines.unclaimed_options():
            engines = ", ".join(self.core.engines.names) or "none"
            lines.append(f"warning: {variable} names no engine and is ignored (engines: {engines})")
        return lines

    def start(self) -> None:
        """Start background work (idle reaper, warm-up); call on the serving event loop."""
        for line in self.summary():
            (log.warning if line.startswith("warning:") else log.info)("%s", line.removeprefix("warning: "))
        self.core.engines.start_reaper()
        self.readiness.task = asyncio.create_task(self.warm_up())

    async def close(self) -> None:
        task = self.readiness.task
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=30)
        await asyncio.to_thread(self.worker.close)
        self.core.close()


__all__ = ["Dispatcher", "Outcome", "Readiness", "TimedOutcome"]
