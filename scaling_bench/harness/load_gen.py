"""A multi-stream load generator: each stream pushes real video frames (paced at `fps` on the
stream's own clock, or back to back when `fps` is None) and asks questions at a fixed interval,
against a target (`targets.HttpTarget` / `targets.DirectTarget`).

Ingest lag of a batch = its acknowledgement time minus the wall time its last frame was due
(stream start + ts). A stream's pushes are sequential, so a server that cannot keep up shows a
growing lag: "ingest fell behind real time"."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from scaling_bench.harness.stats import pct, summary_ms

QUESTIONS = ("What is happening now?", "What changed in the last seconds?", "Who is in the scene?",
             "What color is the largest object?", "Summarize the scene.", "Where is the animal?")


@dataclass
class LoadSpec:
    streams: int
    seconds: float                 # wall seconds of load
    fps: float | None = 1.0        # frames per wall second per stream; None: back to back
    batch_frames: int = 1          # frames per push
    question_every_s: float = 5.0  # per stream; 0: no questions
    max_tokens: int = 16
    warmup_s: float = 0.0          # samples that start earlier are not counted (part of `seconds`)
    prefix: str = "ld"

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_s < self.seconds:
            raise ValueError(f"LoadSpec: warmup_s ({self.warmup_s}) must be in [0, seconds = {self.seconds}): "
                             f"the warm-up is the start of the load, the rest is measured")


@dataclass
class LoadResult:
    spec: dict[str, Any]
    elapsed_s: float
    frames_due: int
    frames_acked: int
    questions: int
    lags: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "streams": self.spec["streams"], "elapsed_s": self.elapsed_s, "frames_due": self.frames_due,
            "frames_acked": self.frames_acked, "ingest_fps": self.frames_acked / self.elapsed_s,
            "questions": self.questions, "questions_per_s": self.questions / self.elapsed_s,
            "lag": summary_ms(self.lags), "ttft": summary_ms(self.ttft), "e2e": summary_ms(self.e2e),
            "errors": len(self.errors), "first_errors": self.errors[:3],
        }

    def sustained(self, max_lag_s: float, max_ttft_p99_s: float) -> bool:
        """Kept up with real time (every due frame acknowledged, lag p99 bounded) and TTFT p99 bounded,
        measured: a load with no lag sample (or no TTFT sample while questions were due) proves nothing."""
        measured = bool(self.lags) and (bool(self.ttft) or not self.spec.get("question_every_s"))
        return (measured and not self.errors and self.frames_acked >= self.frames_due
                and pct(self.lags, 0.99) <= max_lag_s and pct(self.ttft, 0.99) <= max_ttft_p99_s)


async def run_load(target: Any, spec: LoadSpec, frames: list[np.ndarray], progress: bool = True,
                   desc: str = "load") -> LoadResult:
    """Open `spec.streams` streams on `target`, load them for `spec.seconds`, delete them."""
    sids = [f"{spec.prefix}-{i}" for i in range(spec.streams)]
    await asyncio.gather(*(target.create(s) for s in sids))
    paced = spec.fps is not None
    due_total = int(spec.seconds * spec.fps) // spec.batch_frames * spec.batch_frames * spec.streams if paced else None
    res = LoadResult(vars(spec).copy(), 0.0, 0, 0, 0)
    bar = tqdm(total=due_total, desc=desc, unit="frame", disable=not progress, leave=False, mininterval=0.5)
    t0 = time.perf_counter()
    end = t0 + spec.seconds
    counted_from = t0 + spec.warmup_s

    async def pusher(i: int, sid: str) -> None:
        seq, k = 0, 0
        # streams start staggered over one frame period, as independent cameras would
        offset = (i / spec.streams) / spec.fps if paced else 0.0
        while True:
            b = spec.batch_frames
            if paced:
                due = t0 + offset + (k + b) / spec.fps  # the batch's last frame exists from then on
                if due > end + offset:
                    return
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                res.frames_due += b
            elif time.perf_counter() >= end:
                return
            else:
                due = time.perf_counter()
            batch = [frames[(k + j) % len(frames)] for j in range(b)]
            ts = [(k + j) / (spec.fps or 1.0) for j in range(b)]
            try:
                await target.push(sid, seq, batch, ts)
            except Exception as exc:  # counted: a run with errors is not "sustained"
                res.errors.append(f"push {sid}: {type(exc).__name__}: {str(exc)[:120]}")
                return
            now = time.perf_counter()
            res.frames_acked += b
            if due >= counted_from:
                res.lags.append(now - due)
            bar.update(b)
            seq, k = seq + 1, k + b

    async def asker(i: int, sid: str) -> None:
        if spec.question_every_s <= 0:
            return
        n = 0
        # first question after one interval, staggered across streams
        nxt = t0 + spec.question_every_s * (1 + i / spec.streams)
        while nxt < end:
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
            start = time.perf_counter()
            try:
                ttft, total = await target.ask(sid, QUESTIONS[(i + n) % len(QUESTIONS)], spec.max_tokens)
            except Exception as exc:
                res.errors.append(f"ask {sid}: {type(exc).__name__}: {str(exc)[:120]}")
                return
            res.questions += 1
            if start >= counted_from:
                res.ttft.append(ttft)
                res.e2e.append(total)
            n += 1
            nxt = max(nxt + spec.question_every_s, time.perf_counter())

    try:
        await asyncio.gather(*(pusher(i, s) for i, s in enumerate(sids)), *(asker(i, s) for i, s in enumerate(sids)))
        res.elapsed_s = time.perf_counter() - t0
    finally:
        bar.close()
        for s in sids:
            try:
                await target.delete(s)
            except Exception:
                pass
    if not paced:
        res.frames_due = res.frames_acked
    return res
