"""Server RSS over many requests (leaks) and with each engine loaded vs unloaded (a fresh server)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Budget, Context, Figure, Result, Server, median, running
from benchmarks.texts import SHORT_SENTENCE

MB = 1e6


def run(ctx: Context, result: Result) -> None:
    import httpx

    env = ctx.engine_env("piper,xtts,espeak")
    env["TTS_GATEWAY_CACHE_BYTES"] = "0"  # no phrase cache: every request synthesizes
    ctx.log("starting a fresh server for the memory benchmark")
    with running(Server("memory", ctx.workdir, env)) as server, \
            httpx.Client(base_url=server.base, timeout=120) as client:
        growth(ctx, result, server, client)
        loaded_vs_unloaded(ctx, result, server, client)


def growth(ctx: Context, result: Result, server: Server, client: Any) -> None:
    first, last = 10, 100 if ctx.quick else 1000
    budget = Budget(60 if ctx.quick else 360)
    checkpoints = {first, last, *range(0, last + 1, last // 10)}
    trace: dict[int, float] = {}
    done = 0
    while done < last:
        response = client.post("/v1/synthesize", json={"text": SHORT_SENTENCE, "voice": "piper:joe"})
        response.raise_for_status()
        done += 1
        if done in checkpoints:
            trace[done] = server.rss() / MB
        if done >= first and budget.spent():
            result.notes.append(f"time budget spent after {done} of {last} requests")
            break
    end = max(trace)
    result.figures.append(Figure(
        f"RSS after {end} / after {first} requests (Piper, 1 sentence)", trace[end] / trace[first], "×",
        ("<=", 1.10), medians={f"after {first} (MB)": trace[first], f"after {end} (MB)": trace[end]},
        detail={"rss_mb_by_requests": {str(k): round(v, 1) for k, v in sorted(trace.items())}},
    ))


def _admin(client: Any, action: str, engine: str) -> None:
    for _ in range(20):  # 409 while busy: bounded retries
        response = client.post(f"/v1/engines/{engine}/{action}", timeout=600)
        if response.status_code == 200:
            return
        if response.status_code != 409:
            raise RuntimeError(f"{action} {engine}: {response.status_code} {response.text[:300]}")
        time.sleep(0.5)
    raise RuntimeError(f"{action} {engine}: still busy")


def loaded_vs_unloaded(ctx: Context, result: Result, server: Server, client: Any) -> None:
    """Per engine: a first load (imports included), then unload/load cycles; medians over the cycles."""
    cycles = 0 if ctx.quick else 2  # quick: the first load and the final unload only
    engines = [e["name"] for e in client.get("/v1/engines").json()["engines"] if e["available"]]

    def rss_after(action: str, engine: str) -> float:
        _admin(client, action, engine)
        time.sleep(0.5)  # let the allocator settle
        return server.rss() / MB

    for engine in engines:
        before = rss_after("unload", engine)
        first = rss_after("load", engine)
        states: dict[str, list[float]] = {"unloaded": [], "loaded": []}
        for _ in range(cycles):
            states["unloaded"].append(rss_after("unload", engine))
            states["loaded"].append(rss_after("load", engine))
        residual = rss_after("unload", engine)
        if not cycles:
            states = {"unloaded": [residual], "loaded": [first]}
        loaded, unloaded = median(states["loaded"]), median(states["unloaded"])
        result.figures.append(Figure(
            f"{engine}: RSS loaded / unloaded", loaded / unloaded, "×",
            medians={"loaded (MB)": loaded, "unloaded (MB)": unloaded},
            detail={"delta_mb": loaded - unloaded, "first_load_delta_mb": first - before,
                    "kept_after_final_unload_mb": residual - before, "cycles": cycles,
                    "samples_mb": {k: [round(v, 1) for v in vals] for k, vals in states.items()}},
        ))
