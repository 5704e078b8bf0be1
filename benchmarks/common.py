"""Shared machinery: results, interleaved timing, statistics, servers and in-process engines.

Every figure a benchmark reports is a ratio of two things measured in the same run, with the
two sides interleaved (A, B, B, A, A, B, …) so that slow drift of a noisy machine hits both
alike; the raw medians go beside it.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache" / "bench"  # git-ignored; the tiny XTTS checkpoint is kept here
PRESET = "bench"


# -- results -------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One reported number: normally a ratio, with the raw medians it came from."""

    name: str
    value: float | None
    unit: str = "×"
    target: tuple[str, float] | None = None  # ("<=", 1.05)
    medians: dict[str, float] = field(default_factory=dict)  # seconds unless the name says otherwise
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        op, bound = self.target
        return self.value <= bound if op == "<=" else self.value >= bound

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "value": self.value, "unit": self.unit,
            "target": f"{self.target[0]} {self.target[1]:g}" if self.target else None,
            "met": self.met, "medians": self.medians, "detail": self.detail,
        }


class Skip(Exception):
    """A benchmark cannot run here; the message says why."""


@dataclass
class Result:
    name: str
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "seconds": round(self.seconds, 1),
                "notes": self.notes, "figures": [f.to_json() for f in self.figures]}


# -- timing --------------------------------------------------------------------------------------
class Budget:
    """A wall-clock allowance: loops stop early (after their minimum) once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


# onnxruntime's default thread pool (what in-process Piper and wyoming-piper run) keeps a thread
# spinning for ~25 ms after each run: a call made right after one loses a core meanwhile (+17 ms
# for a one-sentence Piper call here). Latency comparisons pause this long before each timed call,
# whichever side it is, so that each side is timed on a quiet machine, as it runs when alone.
SETTLE_S = 0.05


def settle() -> None:
    time.sleep(SETTLE_S)


def interleave(
    sides: dict[str, Callable[[], Any]],
    rounds: int,
    budget: Budget,
    *,
    warmup: int = 1,
    min_rounds: int = 2,
    on_value: Callable[[str, Any], object] | None = None,
    cpu: dict[str, list[float]] | None = None,
    quiet: bool = False,
) -> dict[str, list[float]]:
    """Time each side once per round, alternating the order (A,B then B,A …); bounded.

    Runs ``warmup`` untimed rounds first, then at most ``rounds`` timed ones, and stops early
    once ``budget`` is spent and at least ``min_rounds`` are done. Returns wall-clock seconds;
    ``cpu``, if given, also gets the process's CPU seconds per call (all of the work when the engine
    runs single-threaded — XTTS on its torch thread —, and far less disturbed by other processes).
    ``quiet``: `settle` before each timed call.
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            if quiet:
                settle()
            cpu_started = time.process_time()
            seconds, value = timed(sides[name])
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - cpu_started)
            samples[name].append(seconds)
            if on_value is not None:
                on_value(name, value)
        if index + 1 >= min_rounds and budget.spent():
            break
    return samples


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q1, _q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q1), float(q3)


def paired(name: str, tops: list[float], bottoms: list[float], medians: dict[str, float], *,
           unit: str = "×", target: tuple[str, float] | None = None, **detail: Any) -> Figure:
    """The median of per-round ratios top/bottom (the two were measured side by side).

    A pair shares the machine's state of the moment, so its ratio cancels the load another
    process puts on the box; the median over pairs ignores the rounds a burst hit one side only.
    The ratio of the two medians and the quartiles of the pair ratios go into the detail.
    """
    ratios = [a / b for a, b in zip(tops, bottoms, strict=False) if b > 0]
    top, bottom = median(tops), median(bottoms)
    low, high = quartiles(ratios)
    return Figure(name, median(ratios) if ratios else None, unit, target, medians=medians, detail={
        "rounds": len(ratios), "ratio_of_medians": top / bottom if bottom > 0 else None,
        "paired_ratio_iqr": [low, high], **detail,
    })


def ratio_figure(name: str, samples: dict[str, list[float]], numerator: str, denominator: str, *,
                 target: tuple[str, float] | None = None, **detail: Any) -> Figure:
    """Paired ratio numerator/denominator over interleaved samples, with both raw medians."""
    return paired(name, samples[numerator], samples[denominator],
                  {numerator: median(samples[numerator]), denominator: median(samples[denominator])},
                  target=target, samples={k: [round(v, 5) for v in vals] for k, vals in samples.items()}, **detail)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = intercept + slope·x; returns (slope, intercept, R²)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.sum((y - (intercept + slope * x)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return float(slope), float(intercept), r2


# -- audio ---------------------------------------------------------------------------------------
def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def wav_seconds(data: bytes) -> float:
    """Duration of a 16-bit mono WAV (whole or with an open-ended streaming header)."""
    rate = int.from_bytes(data[24:28], "little")
    index = data.find(b"data", 12)
    payload = len(data) - (index + 8) if index >= 0 else len(data) - 44
    return payload / 2 / rate if rate else 0.0


# -- processes -----------------------------------------------------------------------------------
_HANDED_OUT: set[int] = set()


def terminate(process: subprocess.Popen[Any]) -> None:
    """Stop a server process: SIGTERM, then SIGKILL if it has not stopped within 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def free_port() -> int:
    """A free loopback port, never one this process handed out before: the OS may offer a just-closed
    port again, and a server given the same port for HTTP and Wyoming cannot start."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": sys.version.split()[0], "load_avg_at_start": os.getloadavg()}


class Server:
    """``python -m tts_gateway serve`` on a free 127.0.0.1 port; always stopped by ``stop``.

    Output goes to a log file (a pipe nobody reads would fill up and block the server).
    """

    def __init__(self, name: str, workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.workdir = workdir
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.log_path = workdir / f"{name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, ready_timeout: float = 240.0) -> Server:
        import httpx

        for attempt in range(3):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TTS_GATEWAY_")}
            env.update({
                "TTS_GATEWAY_HOST": "127.0.0.1", "TTS_GATEWAY_PORT": str(port),
                "TTS_GATEWAY_DATA_DIR": str(self.workdir / f"{self.name}-data"),
                "TTS_GATEWAY_TIMEOUT_S": "900", "HF_HUB_OFFLINE": "1", **self.env,
            })
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen([sys.executable, "-m", "tts_gateway", "serve"], env=env, cwd=ROOT,
                                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if httpx.get(self.base + "/ready", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            tail = self.log_tail()
            self.stop()
            if "address already in use" in tail.lower() and attempt < 2:
                continue
            raise RuntimeError(f"server {self.name} did not become ready:\n{tail}")
        raise RuntimeError(f"server {self.name} could not bind a port")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            terminate(process)

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of a Prometheus sample from /metrics (0 when absent)."""
        import httpx

        text = httpx.get(self.base + "/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, label_text = head.partition("{")
            if sample != name:
                continue
            if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                continue
            total += float(value)
        return total


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server.start()
    finally:
        server.stop()


# -- in-process engines --------------------------------------------------------------------------
class InProcess:
    """A `SynthesisService` over real engines in this process (lazy loading, like the gateway)."""

    def __init__(self, workdir: Path, checkpoint: Path, threads: int) -> None:
        from tts_gateway.config import Settings
        from tts_gateway.core.compose import build_core

        self.settings = Settings(data_dir=workdir / "inproc-data", engines=("piper", "xtts", "espeak"),
                                 xtts_checkpoint=checkpoint, engine_threads=threads, max_text_chars=100_000,
                                 canary=False, timeout_s=900)
        self.core = build_core(self.settings, load_entry_points=False, phrase_cache=False)
        self.engines, self.metrics = self.core.engines, self.core.metrics
        self.registry, self.service = self.core.registry, self.core.service

    def synthesize(self, text: str, voice: str | None = None, **options: Any) -> bytes:
        from tts_gateway.core.service import SynthesisRequest

        plan = self.service.plan(SynthesisRequest(text=text, voice=voice, **options))
        return self.service.synthesize_bytes(plan, threading.Event())

    def close(self) -> None:
        self.core.close()


class Context:
    """What benchmarks share within one run: settings, caches, one in-process service, one server."""

    def __init__(self, *, quick: bool, threads: int) -> None:
        self.quick = quick
        self.threads = threads
        self.stack = ExitStack()
        self.workdir = Path(tempfile.mkdtemp(prefix="tts-bench-"))
        self.stack.callback(shutil.rmtree, self.workdir, True)
        self._checkpoint: Path | None = None
        self._speech: bytes | None = None
        self._inproc: InProcess | None = None
        self._server: Server | None = None
        self._server_preset = False
        self._cache_field: bool | None = None

    def close(self) -> None:
        self.stack.close()

    def log(self, message: str) -> None:
        print(f"  · {message}", file=sys.stderr, flush=True)

    # -- artefacts --------------------------------------------------------------------------------
    def tiny_xtts(self) -> Path:
        """The tiny XTTS checkpoint, built once with the real CLI and kept in .cache/bench."""
        if self._checkpoint is not None:
            return self._checkpoint
        target = CACHE_DIR / "tiny-xtts"
        if not all((target / name).is_file() for name in ("config.json", "model.pth", "vocab.json")):
            self.log("building the tiny XTTS checkpoint (once; kept in .cache/bench)")
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix="tiny-xtts-", dir=CACHE_DIR))
            try:
                subprocess.run([sys.executable, "-m", "tts_gateway", "dev", "tiny-xtts", str(building)], check=True,
                               timeout=600, cwd=ROOT, capture_output=True)
                shutil.rmtree(target, ignore_errors=True)
                building.rename(target)
            finally:
                shutil.rmtree(building, ignore_errors=True)
        self._checkpoint = target
        return target

    def speech_wav(self) -> bytes:
        """About 4.5 s of real speech from Piper, as 22.05 kHz WAV (the cloning reference)."""
        if self._speech is None:
            from benchmarks.texts import REFERENCE_TEXT
            from tts_gateway.engines.base import SynthesisOptions, VoiceInput

            piper = self.inproc().engines.ensure_loaded("piper")
            audio = np.concatenate(list(piper.synthesize(REFERENCE_TEXT, VoiceInput(builtin="joe"),
                                                         SynthesisOptions(language="en", seed=1, repeatable=True))))
            self._speech = wav_bytes(audio, piper.sample_rate)
        return self._speech

    def inproc(self) -> InProcess:
        if self._inproc is None:
            self._inproc = InProcess(self.workdir, self.tiny_xtts(), self.threads)
            self.stack.callback(self._inproc.close)
        return self._inproc

    def engine_env(self, engines: str = "piper,xtts,espeak") -> dict[str, str]:
        env = {"TTS_GATEWAY_ENGINES": engines}
        if self.threads:
            env["TTS_GATEWAY_ENGINE_THREADS"] = str(self.threads)
        if "xtts" in engines:
            env["TTS_GATEWAY_XTTS_CHECKPOINT"] = str(self.tiny_xtts())
        return env

    def server(self) -> Server:
        """The shared gateway (Piper, tiny XTTS, espeak-ng), started on first use."""
        if self._server is None:
            self.log("starting the shared gateway server")
            server = Server("shared", self.workdir, self.engine_env())
            self.stack.callback(server.stop)
            server.start()
            self._server = server
        return self._server

    def no_cache(self) -> dict[str, Any]:
        """Body fields that keep the shared server's phrase cache out of a timed request.

        ``{"cache": false}`` where the server knows the field; otherwise nothing (and the
        callers vary the seed, so a cache could not answer anyway).
        """
        if self._cache_field is None:
            import httpx

            response = httpx.post(self.server().base + "/v1/synthesize", timeout=120,
                                  json={"text": "Hi.", "voice": "piper:joe", "cache": False})
            self._cache_field = response.status_code == 200
        return {"cache": False} if self._cache_field else {}

    def server_preset(self) -> str:
        """Register the XTTS preset ``bench`` on the shared server (once); returns its name."""
        server = self.server()
        if not self._server_preset:
            import httpx

            self.log("registering the XTTS preset on the shared server")
            response = httpx.post(server.base + "/v1/voices", timeout=600,
                                  data={"name": PRESET, "language": "en", "consent": "true"},
                                  files={"audio": ("reference.wav", self.speech_wav(), "audio/wav")})
            if response.status_code != 201:
                raise RuntimeError(f"registering the preset failed: {response.status_code} {response.text[:300]}")
            self._server_preset = True
        return PRESET

    def inproc_preset(self) -> str:
        core = self.inproc().core
        if not core.registry.exists(PRESET):
            core.voices.register(PRESET, [("reference.wav", self.speech_wav())], engine_name="xtts",
                                   language="en", consent=True)
        return PRESET
