"""Percentiles and summaries of latency samples (seconds in, milliseconds out)."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0.0 for no samples."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": 1e3 * pct(xs, 0.5), "p99_ms": 1e3 * pct(xs, 0.99), "max_ms": 1e3 * max(xs, default=0.0)}
