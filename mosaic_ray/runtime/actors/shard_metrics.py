"""What a shard counts about itself: totals, histograms and the decaying ingest rate.

Shards count, the Serve ingress renders (`mosaic_ray.serve.metrics`): a snapshot is plain data
(ints, floats, lists, dicts), so it travels over Ray as is and any ingress replica can expose every
shard's figures. Counters only grow for the life of the shard actor; Prometheus computes rates.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time

from mosaic_ray.engine.interface import FINISH_REASONS, AnswerEnd

# Why a question ended, as `mosaic_request_success_total{finished_reason}` counts it: the engine's
# reasons (`FINISH_REASONS`: stop, length, cancelled) plus "error" (the request failed). A question
# whose asker went away before its end (its generator closed) is "cancelled".
FINISHED_REASONS = (*FINISH_REASONS, "error")

# vLLM's buckets (vllm/v1/metrics/loggers.py) for its e2e latency and time per output token.
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)


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


class Histogram:
    """Fixed-bucket histogram in Prometheus' sense, the one accumulator of every shard histogram.

    Invariants: `bounds` strictly increase; `counts[i]` is the number of observations <= bounds[i]
    (cumulative, so non-decreasing, each <= `count`); the +Inf bucket is `count`; `sum` adds every
    observed value.
    """

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram bounds must strictly increase, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i in range(bisect.bisect_left(self.bounds, value), len(self.bounds)):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """{"bounds", "counts" (cumulative), "sum", "count"}: plain data."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum, "count": self.count}


class ShardMeter:
    """Counters of one shard. Only the actor's event loop touches it (no locking).

    Invariant: `waiting` and `running` are the questions between `question()` and its end, each in
    exactly one of them (waiting for its stream's turn, then answering).
    """

    def __init__(self, rate_window_s: float, ttft_buckets_s: tuple[float, ...],
                 e2e_buckets_s: tuple[float, ...] = E2E_BUCKETS_S,
                 tpot_buckets_s: tuple[float, ...] = TPOT_BUCKETS_S) -> None:
        self.frames_total = 0
        self.queries_total = 0
        self.errors_total = 0
        self.migrations_in = 0
        self.migrations_out = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished = dict.fromkeys(FINISHED_REASONS, 0)
        self.waiting = 0
        self.running = 0
        self.ingest = DecayingRate(rate_window_s)  # the queue's retry hints (`IngestQueue.retry_after_s`)
        self.ttft = Histogram(tuple(ttft_buckets_s))
        self.e2e = Histogram(tuple(e2e_buckets_s))
        self.tpot = Histogram(tuple(tpot_buckets_s))

    def frames_added(self, n: int) -> None:
        self.frames_total += n
        self.ingest.add(n)

    def question(self) -> "QuestionMeter":
        """A question admitted to its stream, waiting for its turn (`QuestionMeter.running`)."""
        return QuestionMeter(self)

    def snapshot(self) -> dict:
        return {
            "frames_total": self.frames_total,
            "queries_total": self.queries_total,
            "errors_total": self.errors_total,
            "migrations_in": self.migrations_in,
            "migrations_out": self.migrations_out,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "finished_total": dict(self.finished),
            "requests_waiting": self.waiting,
            "requests_running": self.running,
            "ingest_fps": self.ingest.rate(),
            "ttft_s": self.ttft.snapshot(),
            "e2e_s": self.e2e.snapshot(),
            "tpot_s": self.tpot.snapshot(),
        }


class QuestionMeter:
    """One question's figures, from its admission to its end: a context manager around the answer.

    Times run from `running()` (the question's turn: it reaches the engine): TTFT to the first text
    delta, e2e latency to the engine's `AnswerEnd`, time per output token (vLLM's
    request_time_per_output_token: the decode time over the tokens after the first) once it has
    two or more. Token counters and the latency histograms take only answers that reached their
    end; every question, ended or not, counts once in `finished` (leaving the block without an end:
    "error" on an exception, else "cancelled").
    """

    __slots__ = ("_m", "_start", "_first", "_reason")

    def __init__(self, meter: ShardMeter) -> None:
        self._m, self._start, self._first, self._reason = meter, None, None, None
        meter.waiting += 1

    def __enter__(self) -> "QuestionMeter":
        return self

    def running(self) -> None:
        m = self._m
        m.waiting, m.running, m.queries_total = m.waiting - 1, m.running + 1, m.queries_total + 1
        self._start = time.perf_counter()

    def saw(self, item: str | AnswerEnd) -> float | None:
        """Take one item of the answer; returns the TTFT (s) once the first text delta came."""
        now = time.perf_counter()
        if isinstance(item, AnswerEnd):
            self._ended(item, now)
        elif self._first is None:
            self._first = now
            self._m.ttft.observe(now - self._start)
        return None if self._first is None else self._first - self._start

    def _ended(self, end: AnswerEnd, now: float) -> None:
        m, self._reason = self._m, end.finish_reason
        m.e2e.observe(now - self._start)
        if end.prompt_tokens is not None and end.completion_tokens is not None:
            m.prompt_tokens_total += end.prompt_tokens
            m.generation_tokens_total += end.completion_tokens
            if end.completion_tokens > 1 and self._first is not None:
                m.tpot.observe((now - self._first) / (end.completion_tokens - 1))

    def __exit__(self, exc_type, exc, tb) -> None:
        m = self._m
        if self._start is None:
            m.waiting -= 1
        else:
            m.running -= 1
        gone = exc_type is None or issubclass(exc_type, (GeneratorExit, asyncio.CancelledError))
        m.finished[self._reason or ("cancelled" if gone else "error")] += 1
