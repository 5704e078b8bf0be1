"""Ray mode: memory of the gateway node, which holds no model, and of each engine's replica.

A fresh ``tts-gateway serve`` with ``TTS_GATEWAY_BACKEND=ray`` (a local 2-CPU cluster; Piper and the
tiny XTTS checkpoint, one replica each) registers an XTTS voice, then serves 50 syntheses (Piper and
the preset, alternately). Figures: the gateway process's RSS then (target ≤ 250 MB), each replica's
RSS as it reports it in ``/v1/engines``, and whether torch or onnxruntime was ever mapped into the
gateway process. Skipped when Ray is not installed (``pip install '.[ray]'``).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Context, Figure, Result, Server, Skip, running

MB = 1e6
SYNTHESES = 50


def run(ctx: Context, result: Result) -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise Skip(f"Ray Serve is not installed (pip install '.[ray]'): {exc}") from None
    import httpx

    env = {**ctx.engine_env("piper,xtts"), "TTS_GATEWAY_BACKEND": "ray", "TTS_GATEWAY_RAY_NUM_CPUS": "2",
           "TTS_GATEWAY_CACHE_BYTES": "0", "TTS_GATEWAY_REQUIRE_CONSENT": "0"}
    ctx.log("starting a gateway in ray mode (local cluster)")
    with running(Server("ray-memory", ctx.workdir, env)) as server, \
            httpx.Client(base_url=server.base, timeout=600) as client:
        idle = server.rss() / MB
        created = client.post("/v1/voices", data={"name": "ray-bench", "engine": "xtts", "language": "en"},
                              files={"audio": ("reference.wav", ctx.speech_wav(), "audio/wav")})
        if created.status_code != 201:
            raise RuntimeError(f"registering the preset failed: {created.status_code} {created.text[:300]}")
        count = 10 if ctx.quick else SYNTHESES
        for index in range(count):
            voice = "ray-bench" if index % 2 else "piper:joe"
            response = client.post("/v1/synthesize", json={"text": f"Request number {index}.", "voice": voice,
                                                           "seed": index})
            response.raise_for_status()
        gateway = server.rss() / MB
        libraries = {Path(line.split()[-1]).name for line in Path(f"/proc/{server.pid}/maps").read_text().splitlines()
                     if ".so" in line}
        heavy = sorted(lib for lib in libraries if "torch" in lib or "onnxruntime" in lib)
        replicas = {engine["name"]: engine.get("replicas") or []
                    for engine in client.get("/v1/engines").json()["engines"]}
    result.figures.append(Figure(
        f"gateway process RSS in ray mode after 1 registration + {count} syntheses", gateway, "MB", ("<=", 250.0),
        medians={"after start (MB)": idle, f"after {count} (MB)": gateway},
        detail={"torch_or_onnxruntime_mapped": heavy},
    ))
    for engine, states in sorted(replicas.items()):
        for state in states:
            result.figures.append(Figure(f"{engine} replica RSS (model loaded, same run)", state["rss_bytes"] / MB,
                                         "MB", None, detail={"replica": state["id"], "completed": state["completed"]}))
    result.notes.append("torch/onnxruntime mapped into the gateway process: " + (", ".join(heavy) or "neither"))
