"""A repeated identical seeded request (phrase-cache hit) vs its first time (miss), over HTTP."""

from __future__ import annotations

import functools
import itertools
import secrets

from benchmarks.common import Budget, Context, Result, Skip, ratio_figure, timed
from benchmarks.texts import ONE_SENTENCE


def run(ctx: Context, result: Result) -> None:
    import httpx

    server = ctx.server()
    # Seeds no earlier run used (the server's data dir is new anyway): every first request misses.
    seeds = itertools.count(secrets.randbelow(2**31))
    with httpx.Client(base_url=server.base, timeout=120) as client:
        def post(seed: int) -> httpx.Response:
            response = client.post("/v1/synthesize", json={"text": ONE_SENTENCE, "voice": "piper:joe", "seed": seed})
            response.raise_for_status()
            return response

        probe = post(next(seeds))
        if "x-cache" not in probe.headers:
            raise Skip("no phrase cache")
        post(next(seeds))  # warm-up
        samples: dict[str, list[float]] = {"hit": [], "miss": []}
        labels: list[str] = []
        budget = Budget(20 if ctx.quick else 90)
        for _ in range(3 if ctx.quick else 20):
            seed = next(seeds)
            # A hit can only follow its miss, so this pair cannot alternate its order.
            for side in ("miss", "hit"):
                seconds, response = timed(functools.partial(post, seed))
                samples[side].append(seconds)
                labels.append(f"{side}:{response.headers.get('x-cache')}")
            if budget.spent():
                break
    wrong = [label for label in labels if label.split(":")[0] != label.split(":")[1]]
    if wrong:
        result.notes.append(f"X-Cache did not match expectations for {len(wrong)} requests: {wrong[:5]}")
    result.figures.append(ratio_figure("repeated identical request (hit) / first (miss), Piper", samples,
                                       "hit", "miss", target=("<=", 0.05), x_cache=labels))
