"""Ray Serve backend: per-request overhead vs the local backend, and throughput with 1 vs 2 replicas.

Standalone (not part of ``benchmarks.run``): ``.venv/bin/python -m benchmarks.ray_bench [--out FILE]``.
Needs ``pip install '.[ray]'``. Starts a local Ray cluster on 127.0.0.1 with a temp dir, deploys
Piper, measures, shuts it down. Every figure is a median or a ratio from this one run.

- overhead: median latency of a short seeded request through `RayBackend.call` minus the median of
  the same plan run in-process (``SynthesisService.synthesize_bytes``); target ≤ 20 ms.
- throughput: requests/s for a fixed batch sent with ``--concurrency`` in flight, with 1 then 2
  replicas (the same deployment scaled in place), and their ratio.
- memory: RSS of each Piper replica process (model loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHORT = "Hello there."
MEDIUM = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def _throughput(backend: Any, plans: list[Any], concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(plan: Any) -> None:
        async with sem:
            await backend.call(plan)

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in plans))
    return len(plans) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="sequential requests for the overhead figure")
    parser.add_argument("--batch", type=int, default=24, help="requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args()

    from tts_gateway.config import Settings
    from tts_gateway.core.compose import build_core
    from tts_gateway.core.service import SynthesisRequest
    from tts_gateway.ray.backend import RayBackend
    from tts_gateway.ray.wire import app_name

    data_dir = Path(tempfile.mkdtemp(prefix="tts-ray-bench-"))
    settings = Settings(data_dir=data_dir, engines=("piper",), engine_threads=1, timeout_s=120, canary=False)
    core = build_core(settings, phrase_cache=False)
    registry, service = core.registry, core.service
    ray_settings = settings.with_(ray_num_cpus=args.num_cpus, ray_replicas=1, ray_replica_cpus=args.num_cpus / 2,
                                  ray_max_ongoing_requests=2, ray_max_queued_requests=1000)
    backend = RayBackend(ray_settings, registry, engines=["piper"])
    started = time.perf_counter()
    backend.start()
    start_s = time.perf_counter() - started
    result: dict[str, Any] = {"cluster_start_and_deploy_s": round(start_s, 1)}
    try:
        short = service.plan(SynthesisRequest(text=SHORT, voice="piper:joe", seed=1))
        core.engines.ensure_loaded("piper")
        for _ in range(3):  # warm both paths
            service.synthesize_bytes(short, threading.Event())
            asyncio.run(backend.call(short))
        local: list[float] = []
        remote: list[float] = []

        async def measure() -> None:  # one event loop, as in the gateway
            for _ in range(args.requests):  # interleaved, so drift hits both alike
                t = time.perf_counter()
                service.synthesize_bytes(short, threading.Event())
                local.append(time.perf_counter() - t)
                t = time.perf_counter()
                await backend.call(short)
                remote.append(time.perf_counter() - t)

        asyncio.run(measure())
        result["overhead"] = {
            "local_median_ms": _median_ms(local), "ray_median_ms": _median_ms(remote),
            "overhead_median_ms": round(_median_ms(remote) - _median_ms(local), 2),
            "ray_over_local": round(statistics.median(remote) / statistics.median(local), 2),
            "target_ms": 20,
        }
        plans = [service.plan(SynthesisRequest(text=MEDIUM, voice="piper:joe", seed=i)) for i in range(args.batch)]
        rps_1 = asyncio.run(_throughput(backend, plans, args.concurrency))
        stats_1 = asyncio.run(backend.replica_stats("piper", calls=4))

        from ray import serve

        backend.cluster.overrides.setdefault("piper", {})["num_replicas"] = 2
        serve.run(backend.cluster.application("piper"), name=app_name("piper"), route_prefix=None)  # scale in place
        asyncio.run(_throughput(backend, plans[:4], args.concurrency))  # warm the new replica
        rps_2 = asyncio.run(_throughput(backend, plans, args.concurrency))
        stats_2 = asyncio.run(backend.replica_stats("piper", calls=16))
        result["throughput"] = {
            "concurrency": args.concurrency, "batch": args.batch,
            "one_replica_rps": round(rps_1, 2), "two_replicas_rps": round(rps_2, 2),
            "two_over_one": round(rps_2 / rps_1, 2), "replicas_seen": [len(stats_1), len(stats_2)],
        }
        result["replica_rss_mb"] = [round(s["rss"] / 1e6, 1) for s in stats_2]
    finally:
        backend.close()
        core.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
