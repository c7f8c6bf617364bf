"""CapacityGate: a shard admits a new stream only while its measured capacity holds it.

The engine reports the seconds it spent working (`busy_s_total` in its stats: vision, forwards,
sampling, commits, offloads of staged tokens; not cluster splits, which fill the time left). Over
the last `window_s` the gate takes utilization = busy seconds / wall seconds; a new stream, taken
to cost what the average stream of the shard costs, would make it utilization x (streams + 1) /
streams. Above `max_utilization` the new stream is refused with 503
and a Retry-After (the router then tries the next shard), instead of every stream's lag growing
silently. With no samples yet, or no streams, everything is admitted (there is nothing to measure).

Pure arithmetic over the samples it is fed (`observe(wall, busy)`), tested without an engine.
"""

from __future__ import annotations

from collections import deque


class CapacityGate:
    def __init__(self, max_utilization: float | None, window_s: float = 30.0) -> None:
        self.max_utilization = max_utilization
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (wall clock, engine busy seconds)

    def observe(self, wall: float, busy_s: float) -> None:
        self._samples.append((wall, busy_s))
        while len(self._samples) > 2 and wall - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def utilization(self) -> float | None:
        """Busy share of the engine over the window (None: too little measured yet)."""
        if len(self._samples) < 2:
            return None
        (w0, b0), (w1, b1) = self._samples[0], self._samples[-1]
        if w1 - w0 < 1e-3:
            return None
        return max(0.0, min(1.0, (b1 - b0) / (w1 - w0)))

    def refusal(self, streams: int) -> str | None:
        """Why one more stream does not fit, or None when it does."""
        u = self.utilization()
        if self.max_utilization is None or u is None or streams == 0:
            return None
        projected = u * (streams + 1) / streams
        if projected <= self.max_utilization:
            return None
        return (f"shard at capacity: its engine was busy {u:.0%} of the last {self.window_s:.0f} s with "
                f"{streams} streams; one more would need ~{projected:.0%} (limit {self.max_utilization:.0%})")

    def retry_after_s(self) -> float:
        return max(1.0, min(30.0, self.window_s / 3))
