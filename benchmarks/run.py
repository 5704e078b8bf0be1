"""``python -m benchmarks.run [--quick] [--only NAME,...] [--out PATH]``: run, print a table, write JSON.

See benchmarks/README.md for what each benchmark measures and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Context, Result, Skip, machine

# Run in this order: cheap and server-sharing ones first, the fresh-server memory run near the end.
BENCHMARKS = {
    "http_overhead": "benchmarks.http_overhead",
    "preset_vs_raw": "benchmarks.preset_vs_raw",
    "streaming_ttfa": "benchmarks.streaming_ttfa",
    "wyoming_ttfa": "benchmarks.wyoming_ttfa",
    "piper_load": "benchmarks.piper_load",
    "scaling": "benchmarks.scaling",
    "memory": "benchmarks.memory",
    "intelligibility": "benchmarks.intelligibility",
    "phrase_cache": "benchmarks.phrase_cache",
    "kokoro": "benchmarks.kokoro_bench",
    "timestamps": "benchmarks.timestamps",
    "xtts_streaming": "benchmarks.xtts_streaming",
    "xtts_real_size": "benchmarks.xtts_real_size",
    "xtts_batching": "benchmarks.xtts_batching",
    "ray_memory": "benchmarks.ray_memory",
    "text_frontend": "benchmarks.text_frontend",
}
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny repeat counts: a smoke run (< 2 min)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown here")
    parser.add_argument("--threads", type=int, default=1,
                        help="engine threads, in-process and on the servers (TTS_GATEWAY_ENGINE_THREADS); "
                             "0 = library defaults (default: %(default)s)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = [n for n in BENCHMARKS if n in names]
    return args


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None


def run_one(name: str, ctx: Context) -> Result:
    result = Result(name)
    print(f"▶ {name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        module = importlib.import_module(BENCHMARKS[name])
        module.run(ctx, result)
    except Skip as exc:
        result.status, result.reason = "skipped", str(exc)
    except Exception as exc:
        result.status, result.reason = "error", f"{type(exc).__name__}: {exc}".splitlines()[0]
        traceback.print_exc(file=sys.stderr)
    result.seconds = time.perf_counter() - started
    print(f"  {name}: {result.status}" + (f": {result.reason}" if result.reason else "")
          + f" ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
    return result


# -- output --------------------------------------------------------------------------------------
def fmt_value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return text + ("×" if unit == "×" else f" {unit}" if unit else "")


PLAIN = ("req/s", "R²", "WER", "words", "errors", "count", "n=")


def fmt_median(key: str, value: float) -> str:
    """Seconds unless the key names another unit (MB, req/s, R², …)."""
    if math.isnan(value):
        return f"{key} —"
    if "MB" in key:
        return f"{key} {value:.0f}"
    if any(marker in key for marker in PLAIN):
        return f"{key} {value:.3g}"
    if value < 1:
        return f"{key} {value * 1000:.1f} ms"
    return f"{key} {value:.2f} s"


def rows(results: list[Result]) -> list[list[str]]:
    table = []
    for result in results:
        if result.status != "ok":
            table.append([result.name, f"{result.status}: {result.reason or ''}", "—", "—", "—", ""])
            continue
        for figure in result.figures:
            met = {True: "met", False: "MISSED", None: "—"}[figure.met]
            target = f"{figure.target[0]} {figure.target[1]:g}" if figure.target else "—"
            medians = "; ".join(fmt_median(k, v) for k, v in figure.medians.items())
            iqr = figure.detail.get("paired_ratio_iqr")
            if iqr and figure.detail.get("rounds", 0) >= 4:
                medians += f"; pair ratios IQR {iqr[0]:.3f}–{iqr[1]:.3f}"
            table.append([result.name, figure.name, fmt_value(figure.value, figure.unit), target, met, medians])
    return table


HEADER = ["benchmark", "figure", "value", "target", "result", "raw medians"]


def text_table(results: list[Result]) -> str:
    data = [HEADER, *rows(results)]
    widths = [max(len(r[i]) for r in data) for i in range(len(HEADER) - 1)]
    lines = []
    for index, row in enumerate(data):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])) + "  " + row[-1])
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    notes = [f"note ({r.name}): {n}" for r in results for n in r.notes]
    return "\n".join(lines + notes)


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    started = time.perf_counter()
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(), "quick": args.quick, "threads": args.threads,
        "machine": machine(), "argv": sys.argv[1:] if argv is None else argv,
    }
    ctx = Context(quick=args.quick, threads=args.threads)
    results: list[Result] = []
    try:
        for name in args.names:
            results.append(run_one(name, ctx))
    finally:
        ctx.close()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    print(text_table(results))
    print(f"\n{len(results)} benchmark(s) in {meta['seconds']:.0f} s; results in {args.out}", file=sys.stderr)
    write_json(args.out, {"meta": meta, "benchmarks": {r.name: r.to_json() for r in results}})
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(results) + "\n")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
