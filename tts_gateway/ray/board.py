"""What the gateway knows about the replicas: a small Ray actor every replica reports to.

Serve routes a call to *one* replica of a deployment; it has no public way to reach each replica,
nor to read a replica's state. So each replica reports to the `Board` (a named, CPU-less actor) every
`HEARTBEAT_S`: its engine's description (languages, sample rate, voices, model sha256,
availability), whether its model is loaded, its requests in flight, its memory and its engine
metrics. The report's answer carries the engine's latest load/unload order, which the replica carries
out and acknowledges in the next report. The gateway keeps a `ClusterView` of the board, refreshed
in the background, so answering ``/v1/engines`` or planning a request never waits on the cluster.

Everything on the board is plain values (dicts, strings, numbers).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

log = logging.getLogger(__name__)

BOARD_NAME = "tts-gateway-board"
NAMESPACE = "tts-gateway"
HEARTBEAT_S = 0.5
# A replica silent for this long is gone (a crashed process, a lost node); one that stops cleanly
# leaves the board at once. Generous, so that a replica busy on every core is not dropped.
STALE_S = 10.0
DESCRIBE_EVERY_S = 10.0  # a replica re-reads its engine's description (voices on disk may change)
# The engine metrics a replica reports; the gateway exposes them with a ``replica`` label.
REPLICA_METRICS = ("tts_synthesis_seconds", "tts_time_to_first_audio_seconds", "tts_real_time_factor",
                   "tts_audio_seconds", "tts_conditioning_computations", "tts_voice_cache_hits",
                   "tts_engine_loaded", "tts_batch_size")


class Board:
    """The Ray actor (``num_cpus=0``, named `BOARD_NAME` in `NAMESPACE`, detached so that every
    gateway joined to the cluster shares it)."""

    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._orders: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """Store a replica's state; returns its engine's latest order (``seq``, ``action``), if any."""
        self._replicas[replica] = {**state, "seen": time.monotonic()}
        return self._orders.get(str(state.get("engine")))

    def leave(self, replica: str) -> None:
        self._replicas.pop(replica, None)

    def order(self, engine: str, action: str) -> int:
        """A new load/unload order for every replica of ``engine``; returns its sequence number."""
        seq = int(self._orders.get(engine, {}).get("seq", 0)) + 1
        self._orders[engine] = {"seq": seq, "action": action}
        return seq

    def snapshot(self) -> dict[str, Any]:
        """Every replica heard from within `STALE_S`, with ``age`` (seconds since its last report)."""
        now = time.monotonic()
        for replica in [r for r, s in self._replicas.items() if now - s["seen"] > 30 * STALE_S]:
            del self._replicas[replica]  # long gone: forget it
        return {"replicas": {r: {**s, "age": now - s["seen"]} for r, s in self._replicas.items()
                             if now - s["seen"] <= STALE_S},
                "orders": dict(self._orders)}


def board_handle(create: bool) -> Any:
    """The cluster's board actor (created when ``create`` and missing); needs ``ray.init`` first."""
    import ray

    if create:
        actor = ray.remote(Board).options(
            name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
            max_restarts=-1)
        return actor.remote()
    return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)


# -- what a replica says about its engine ------------------------------------------------------------
def describe(engine: Any) -> dict[str, Any]:
    """An engine's description as plain values: what the gateway needs to plan and to list it."""
    from tts_gateway.engines.base import BlendingEngine, CloningEngine, LanguageNamingEngine, timestamp_levels

    available, reason = engine.availability()
    try:
        model = engine.model
        model_values: dict[str, Any] | None = {"id": model.id, "sha256": model.sha256, "licence": model.licence}
    except Exception:  # an unavailable engine may not be able to describe its model
        model_values = None
    languages = [str(code) for code in engine.languages] if available else []
    cloning = isinstance(engine, CloningEngine)
    return {
        "name": engine.name, "available": available, "reason": reason,
        "capabilities": asdict(engine.capabilities), "sample_rate": int(engine.sample_rate),
        "languages": languages,
        "language_names": dict(engine.language_names) if isinstance(engine, LanguageNamingEngine) else {},
        "model": model_values,
        "voices": [{**asdict(v), "languages": list(v.languages)} for v in engine.voices()] if available else [],
        "max_chars": {code: int(engine.max_chars(code)) for code in languages},
        "cloning": cloning, "blending": isinstance(engine, BlendingEngine),
        "timestamps": list(timestamp_levels(engine)),
        "reference_sample_rate": int(engine.reference_sample_rate) if cloning else None,
    }


class Reporter:
    """A replica's heartbeat to the board, in a daemon thread; carries out load/unload orders.

    Args:
        replica: This replica's id (Serve's unique replica id).
        state: Returns the replica's current state (engine, loaded, in flight, ...), cheap to call.
        description: Returns the engine description (called at start and every `DESCRIBE_EVERY_S`).
        metrics: Returns the replica's engine metrics in Prometheus text format.
        carry_out: Runs an order's action (``load``/``unload``); returns ``ok`` or ``refused``, raises on failure.
    """

    def __init__(self, replica: str, state: Callable[[], dict[str, Any]], description: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str], carry_out: Callable[[str], str]) -> None:
        self.replica = replica
        self._state = state
        self._description = description
        self._metrics = metrics
        self._carry_out = carry_out
        self._stop = threading.Event()
        self._described: dict[str, Any] | None = None
        self._described_at = 0.0
        self._order: dict[str, Any] = {"seq": 0, "state": "done", "detail": None}
        self._board: Any = None
        self._joined = False  # reported once: orders from then on are for this replica
        self._thread = threading.Thread(target=self._loop, name="board-reporter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> None:
        """Re-read the description at the next beat (after a load or unload)."""
        self._described_at = 0.0

    def stop(self) -> None:
        """Leave the board now (a replica shutting down), so the gateway does not wait for `STALE_S`."""
        self._stop.set()
        board = self._board
        if board is not None:
            try:
                import ray

                ray.get(board.leave.remote(self.replica), timeout=2)
            except Exception as exc:
                log.debug("leaving the board failed: %s", exc)

    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                if self._board is None:
                    self._board = board_handle(create=False)
                now = time.monotonic()
                if self._described is None or now - self._described_at > DESCRIBE_EVERY_S:
                    self._described, self._described_at = self._description(), now
                state = {**self._state(), "replica": self.replica, "pid": os.getpid(), "node": socket.gethostname(),
                         "description": self._described, "metrics": self._metrics(), "order": dict(self._order)}
                order = ray.get(self._board.report.remote(self.replica, state), timeout=10)
                if order and self._joined is False:
                    # An order given before this replica existed is not for it (an autoscaled or
                    # restarted replica must not unload itself): it starts as its settings say.
                    self._order = {"seq": int(order["seq"]), "state": "ok", "detail": None, "action": None}
                elif order and int(order["seq"]) > int(self._order["seq"]) and self._order["state"] != "running":
                    self._start_order(int(order["seq"]), str(order["action"]))
                self._joined = True
            except Exception as exc:  # the board restarting, a slow cluster: try again at the next beat
                log.debug("board report failed: %s", exc)
                self._board = None if "not found" in str(exc).lower() else self._board
            self._stop.wait(HEARTBEAT_S)

    def _start_order(self, seq: int, action: str) -> None:
        self._order = {"seq": seq, "state": "running", "detail": None, "action": action}

        def run() -> None:
            try:
                outcome = self._carry_out(action)
                self._order = {"seq": seq, "state": outcome, "detail": None, "action": action}
            except Exception as exc:
                detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
                self._order = {"seq": seq, "state": "failed", "detail": str(detail), "action": action}
            self.refresh()

        threading.Thread(target=run, name=f"order-{action}", daemon=True).start()


# -- the gateway's view ------------------------------------------------------------------------------
class ClusterView:
    """The board as last read, refreshed every `HEARTBEAT_S` in a daemon thread."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self._snapshot: dict[str, Any] = {"replicas": {}, "orders": {}}
        self._descriptions: dict[str, dict[str, Any]] = {}  # the last one heard per engine, kept when replicas go
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="cluster-view", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def refresh(self) -> None:
        import ray

        try:
            snapshot = ray.get(self.board.snapshot.remote(), timeout=10)
            self.error = None
        except Exception as exc:
            self.error = f"the Ray cluster's replica board cannot be read: {type(exc).__name__}"
            log.warning("%s: %s", self.error, exc)
            return
        for state in sorted(snapshot["replicas"].values(), key=lambda s: -s["age"]):  # the freshest wins
            if state.get("description"):
                self._descriptions[str(state["engine"])] = state["description"]
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.refresh()

    def replicas(self, engine: str) -> list[dict[str, Any]]:
        """The live replicas of ``engine``, by id."""
        found = [s for s in self._snapshot["replicas"].values() if s.get("engine") == engine]
        return sorted(found, key=lambda s: str(s.get("replica")))

    def description(self, engine: str) -> dict[str, Any] | None:
        return self._descriptions.get(engine)

    def metrics(self) -> list[tuple[str, str]]:
        """(replica id, Prometheus text) of every live replica."""
        return [(str(s["replica"]), str(s.get("metrics") or "")) for s in self._snapshot["replicas"].values()]

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until ``done()`` holds after a refresh, or ``timeout`` seconds; returns ``done()``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, HEARTBEAT_S * 2))
        return True


def replica_values(state: Mapping[str, Any]) -> dict[str, Any]:
    """A replica's state as ``/v1/engines`` shows it."""
    return {"id": str(state.get("replica")), "node": str(state.get("node", "")), "pid": int(state.get("pid", 0)),
            "loaded": bool(state.get("loaded")), "in_flight": int(state.get("running", 0)),
            "completed": int(state.get("completed", 0)), "failed": int(state.get("failed", 0)),
            "rss_bytes": int(state.get("rss", 0)), "last_report_s": round(float(state.get("age", 0.0)), 3)}
