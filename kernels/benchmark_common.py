"""Shared timing, table and JSON helpers for the kernels/benchmark_*.py scripts.

Each op is timed after warm-up (compilation) two ways, see `time_op`:
  us          per call, back-to-back calls on one stream (throughput; GB/s is computed from it)
  latency_us  one isolated call + synchronize, median (what a lone call on the critical path costs,
              Python wrapper and launch included)
Host work inside an op (a CPU index_select before its copy) is in both. On CPU (smoke runs under
TRITON_INTERPRET=1) the numbers mean nothing: the smoke run only proves the script's code paths.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

# Measured on one H100 (torch 2.11): >= 64 MB pinned host-to-device copies.
PINNED_PEAK_GBPS = 53.5
# HBM device-to-device, H100, measured (H200 ~4300).
HBM_PEAK_GBPS = 3000.0


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the JSON result")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    return p.parse_args(argv)


def bench_device(smoke: bool) -> torch.device:
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda", torch.cuda.current_device())
    if smoke:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    raise SystemExit("this benchmark needs a CUDA device (use --smoke on CPU with TRITON_INTERPRET=1)")


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    from mosaic_ray.kernels import backend

    env["triton_interpret"] = backend.INTERPRET
    return env


def time_op(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, reps: int | None = None, budget_s: float = 0.25
) -> dict[str, float]:
    """us: per call over `reps` back-to-back calls (CUDA events around the loop; launches queue
    ahead, so this is the GPU time unless the op is launch-bound, then it is the launch time);
    latency_us: median of single calls each followed by a synchronize (what one isolated call costs)."""
    for _ in range(warmup):
        fn()
    if reps is None:  # as many as fit in about budget_s, 3..100
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        reps = int(min(100, max(3, budget_s / max(time.perf_counter() - t0, 1e-6))))
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per = (time.perf_counter() - t0) / reps * 1e6
        return {"us": per, "latency_us": per}
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) * 1e3 / reps
    samples = []
    for _ in range(max(3, reps // 2)):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"us": per_call, "latency_us": statistics.median(samples)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attempt(record: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; a failure is recorded (error string), never fatal for the run."""
    try:
        record.update(fn())
        record.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        record["status"] = "error"
        record["error"] = f"{type(e).__name__}: {e}"
    return record


def throughput(record: dict[str, Any], nbytes: int, peak_gbps: float) -> dict[str, Any]:
    """Add GB/s (bytes per pipelined call time `us`) and the fraction of `peak_gbps`."""
    us = record.get("us")
    if us:
        record["gbps"] = nbytes / (us * 1e-6) / 1e9
        record["frac_of_peak"] = record["gbps"] / peak_gbps
    record["bytes"] = nbytes
    return record


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n== {title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
        if r.get("status") == "error":
            print(f"    ! {r['error'][:300]}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_json(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def fallbacks() -> dict[str, int]:
    from mosaic_ray.kernels import backend

    return dict(backend.FALLBACKS)
