"""The one timing helper of every benchmark (scripts, harness and kernel benchmarks).

  sync(device)        wait for the work queued on a CUDA device; nothing on a CPU
  timed(fn, device)   (seconds, result) of one call, the device synchronized before and after
  median_s(fn, ...)   median seconds of isolated calls (CUDA events on a GPU, wall clock on a CPU)
  time_op(fn, ...)    a kernel benchmark's two numbers: `us` per call back to back (throughput)
                      and `latency_us` of one isolated call (what a lone call on the critical path costs)

Every measurement runs after warm-up (compilation, graph capture). On a CPU under
TRITON_INTERPRET=1 the kernel numbers mean nothing: such a smoke run only proves the code paths.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def _device(device: torch.device | str | None) -> torch.device | None:
    """`device` as a torch.device; None or "auto": the current CUDA device once CUDA is in use, else None."""
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.device(device)


def _is_cuda(device: torch.device | str | None) -> bool:
    d = _device(device)
    return d is not None and d.type == "cuda"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the work queued on `device` when it is a CUDA device (None or "auto": the current
    CUDA device, once CUDA is in use); nothing on a CPU."""
    if _is_cuda(device):
        torch.cuda.synchronize(_device(device))


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, Any]:
    """Seconds one call of `fn` takes, host work and device work queued by it, and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_s(fn: Callable[[], Any], device: torch.device | str | None = None, *, reps: int = 20,
             warmup: int = 0) -> float:
    """Median seconds of `reps` isolated calls of `fn` after `warmup` untimed ones: on a CUDA
    device, CUDA events around each call (device time); elsewhere the wall clock."""
    for _ in range(warmup):
        fn()
    if not _is_cuda(device):
        return statistics.median(timed(fn)[0] for _ in range(reps))
    sync(device)
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(samples)


def time_op(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, reps: int | None = None,
            budget_s: float = 0.25) -> dict[str, float]:
    """us: per call over `reps` back-to-back calls (CUDA events around the loop; launches queue
    ahead, so this is the GPU time unless the op is launch-bound, then it is the launch time);
    latency_us: median of single calls each followed by a synchronize. reps=None: as many as fit
    in about `budget_s`, 3..100."""
    for _ in range(warmup):
        fn()
    if reps is None:
        reps = int(min(100, max(3, budget_s / max(timed(fn, device)[0], 1e-6))))
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per = (time.perf_counter() - t0) / reps * 1e6
        return {"us": per, "latency_us": per}
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) * 1e3 / reps
    latency = statistics.median(timed(fn, device)[0] * 1e6 for _ in range(max(3, reps // 2)))
    return {"us": per_call, "latency_us": latency}
