"""Arguments, device, environment, table and JSON helpers of the kernel benchmarks
(`scaling_bench/kernels/*.py`). Each op is timed by `scaling_bench.harness.timing.time_op`:
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


def finish(out_dir: Path, name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with the kernels' fallback counts, written as `<out_dir>/<name>.json`."""
    payload["fallbacks"] = fallbacks()
    write_json(out_dir, name, payload)
    return payload


def fallbacks() -> dict[str, int]:
    from mosaic_ray.kernels import backend

    return dict(backend.FALLBACKS)
