"""Percentiles and summaries of latency samples (seconds in, milliseconds out)."""

from __future__ import annotations


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96): (low, high); (0, 1) for n = 0.
    Right where a normal interval is not: at 0/10 it gives (0, 0.28), not (0, 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def tally(rows: list[dict]) -> dict:
    """Right / asked of question rows (each with a bool "correct"), the accuracy and its 95 %
    Wilson interval."""
    right, n = sum(r["correct"] for r in rows), len(rows)
    return {"correct": right, "questions": n, "accuracy": right / max(1, n), "accuracy_ci95": wilson(right, n)}


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0.0 for no samples."""
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": 1e3 * pct(xs, 0.5), "p99_ms": 1e3 * pct(xs, 0.99), "max_ms": 1e3 * max(xs, default=0.0)}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for paired right/wrong outcomes of two methods on the same
    questions: only_a = questions only method A answered right, only_b = only B. Under "no
    difference" each discordant question is a fair coin; 1.0 when there are none."""
    from math import comb

    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
