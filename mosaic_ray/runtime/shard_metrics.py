"""What a shard counts about itself: totals, decaying rates and a time-to-first-token histogram.

Shards count, the Serve ingress renders (`mosaic_ray.serve.metrics`): a snapshot is plain data, so
any ingress replica can expose every shard's figures, and a rate here is the same number the
router uses as load.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field


class DecayingRate:
    """Events per second, exponentially weighted with time constant `window_s`.

    Invariant: after a steady rate r for several windows, `rate()` is ~r; after silence it decays
    towards 0 with half-life `window_s * ln 2`.
    """

    __slots__ = ("window_s", "_acc", "_last")

    def __init__(self, window_s: float, initial_rate: float = 0.0) -> None:
        self.window_s = window_s
        self._acc = initial_rate * window_s
        self._last = time.monotonic()

    def add(self, n: float = 1.0, now: float | None = None) -> None:
        self._decay(time.monotonic() if now is None else now)
        self._acc += n

    def rate(self, now: float | None = None) -> float:
        self._decay(time.monotonic() if now is None else now)
        return self._acc / self.window_s

    def _decay(self, now: float) -> None:
        if now > self._last:
            self._acc *= math.exp(-(now - self._last) / self.window_s)
            self._last = now


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram in Prometheus' sense: counts[i] = observations <= bounds[i]."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i in range(bisect.bisect_left(self.bounds, value), len(self.bounds)):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def snapshot(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.total, "count": self.n}


class ShardMeter:
    """Counters of one shard. Only the actor's event loop touches it (no locking)."""

    def __init__(self, rate_window_s: float, ttft_buckets_s: tuple[float, ...]) -> None:
        self.frames_total = 0
        self.queries_total = 0
        self.errors_total = 0
        self.migrations_in = 0
        self.migrations_out = 0
        self.ingest = DecayingRate(rate_window_s)
        self.queries = DecayingRate(rate_window_s)
        self.ttft = Histogram(tuple(ttft_buckets_s))

    def frames_added(self, n: int) -> None:
        self.frames_total += n
        self.ingest.add(n)

    def query_started(self) -> None:
        self.queries_total += 1
        self.queries.add()

    def snapshot(self) -> dict:
        return {
            "frames_total": self.frames_total,
            "queries_total": self.queries_total,
            "errors_total": self.errors_total,
            "migrations_in": self.migrations_in,
            "migrations_out": self.migrations_out,
            "ingest_fps": self.ingest.rate(),
            "queries_per_s": self.queries.rate(),
            "ttft_s": self.ttft.snapshot(),
        }
