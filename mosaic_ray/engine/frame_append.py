"""Appending frames of one or several streams: validation, pruning, deferral, partial commits.

`append_frames_batch(engine, items)` is the engine's batched append (one vision batch and one
decoder forward for every stream that is ready). Its contract:

- Everything is validated before anything changes (shapes, timestamps, the deferral bound); a call
  that fails validation changes no stream.
- A stream whose question has not run its prefill step yet defers its frames (acknowledged,
  ingested right after that step); during the rest of an answer frames are ingested at once
  (`engine/question.py` says how positions keep the answer exact).
- Streams commit one after another after the shared forward (`StreamEngine._ingest`). If a commit
  fails (the host pool is full, say) the streams before it keep their frames: the call raises
  `BatchPartlyAppliedError` naming them, and every other stream is exactly as before the call, so
  a caller can retry just those. With one entry there is nothing partial: the error is raised as is.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from mosaic_ray import bounds
from mosaic_ray.engine.interface import BatchPartlyAppliedError, InvalidInputError, OverloadedError
from mosaic_ray.engine.stream_state import WaitingFrames

if TYPE_CHECKING:
    import asyncio

    from mosaic_ray.engine.stream_state import StreamState


class PartialCommitError(Exception):
    """Raised by `StreamEngine._ingest`: rows [0, committed) of the step are in, the rest are not."""

    def __init__(self, committed: int, cause: BaseException) -> None:
        super().__init__(committed, cause)
        self.committed, self.cause = committed, cause


def check_time(ts: float, what: str) -> None:
    """Raise InvalidInputError unless `ts` is a stream time the engine can use: the service's own
    bound (`bounds.check_time`: finite, in [0, MAX_TIME_S]; past it a time breaks the stream
    clock's arithmetic, a ts=1e300 frame once left its stream unable to answer)."""
    try:
        bounds.check_time(ts)
    except ValueError as err:
        raise InvalidInputError(f"{what}: {err}, got {ts!r}") from None


def check_frames(max_frames: int, state: StreamState, frames, timestamps, after: float | None = None) -> None:
    """Raise InvalidInputError unless `frames` are RGB uint8 arrays with non-decreasing timestamps
    at or after the stream clock (and after `after`, the last frame already queued)."""
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise InvalidInputError("frames must be a non-empty list")
    if len(frames) != len(timestamps):
        raise InvalidInputError(f"got {len(frames)} frames but {len(timestamps)} timestamps")
    if len(frames) > max_frames:
        raise InvalidInputError(f"at most {max_frames} frames per call, got {len(frames)}")
    last = state.clock if after is None else max(state.clock, after)
    for i, (f, ts) in enumerate(zip(frames, timestamps)):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            got = f"{type(f).__name__} {getattr(f, 'dtype', '')} {getattr(f, 'shape', '')}"
            raise InvalidInputError(f"frame {i}: expected an RGB uint8 array [H, W, 3], got {got}")
        if min(f.shape[:2]) < 14 or max(f.shape[:2]) > 8192:
            raise InvalidInputError(f"frame {i}: size {f.shape[:2]} outside [14, 8192] pixels")
        check_time(ts, f"frame {i}")
        if ts < last:
            raise InvalidInputError(f"frame {i}: timestamp {ts} goes back before the stream clock {last}")
        last = ts


def append_frames_batch(engine, items: list[tuple[str, list[np.ndarray], list[float]]]) -> list[int]:
    """See the module docstring (`engine`: the StreamEngine, which calls this; no import back up);
    returns the frames each stream holds (deferred ones included)."""
    states = [engine._get(sid) for sid, _, _ in items]
    if len({s.stream_id for s in states}) != len(states):
        raise InvalidInputError("append_frames_batch: one entry per stream")
    cfg = engine.config
    for state, (_, frames, ts) in zip(states, items):
        check_frames(cfg.max_frames_per_call, state, frames, ts)
    # Near-duplicates are dropped before the encoder; their timestamps still move the clock.
    plans = [engine.pruner.plan(state.pruning, frames, ts) for state, (_, frames, ts) in zip(states, items)]
    kept = [(plan.kept(frames), plan.kept(ts)) for plan, (_, frames, ts) in zip(plans, items)]
    # a stream whose frames already wait (for a question's prefill, or for the step loop) queues
    # these behind them, so its frames enter in order
    waits = [state.awaiting_prefill or bool(state.deferred) for state in states]
    for state, wait, (frames, _) in zip(states, waits, kept):
        if frames and wait and state.waiting_frames + len(frames) > cfg.max_deferred_frames:
            raise OverloadedError(f"stream {state.stream_id!r}: too many frames waiting for ingest")
    applied, ready, flush = [], [], []
    for i, (state, (frames, ts)) in enumerate(zip(states, kept)):
        if not frames:
            applied.append(i)
        elif waits[i]:
            state.deferred.append(WaitingFrames(list(frames), list(ts), time.monotonic()))
            applied.append(i)
            if not state.awaiting_prefill:
                flush.append(state)  # nothing holds them back: in now (unless the step loop takes them)
        else:
            ready.append(i)
    error, done = None, len(ready)
    if ready:
        try:
            engine._ingest_frames([(states[i], list(kept[i][0]), [float(t) for t in kept[i][1]]) for i in ready])
        except PartialCommitError as exc:
            error, done = exc.cause, exc.committed
        except Exception as exc:
            error, done = exc, 0
    applied += ready[:done]
    for state in flush:
        engine._flush_deferred(state)
    for i in applied:
        engine.pruner.commit(states[i].pruning, plans[i])
        states[i].clock = max(states[i].clock, float(items[i][2][-1]))
    held = [s.frames + s.waiting_frames for s in states]
    if error is not None:
        if not applied:
            raise error
        raise BatchPartlyAppliedError({states[i].stream_id: held[i] for i in sorted(applied)}, error)
    return held


def submit_frames(engine, state: StreamState, frames, timestamps, done: asyncio.Future | None = None) -> int:
    """Queue frames of one stream for the engine's step loop: validated (after the frames already
    queued) and pruned now, ingested by a later step under the scheduler's budgets. Returns the
    frames the stream holds, queued ones included; a full queue is an overload (503). `done`
    (optional) is settled when they are ingested (`WaitingFrames`); with every frame pruned it is
    settled at once."""
    queued = [t for w in state.deferred for t in w.timestamps]
    check_frames(engine.config.max_frames_per_call, state, frames, timestamps, after=queued[-1] if queued else None)
    plan = engine.pruner.plan(state.pruning, frames, timestamps)
    kept, kept_ts = plan.kept(frames), [float(t) for t in plan.kept(timestamps)]
    if len(queued) + len(kept) > engine.config.max_deferred_frames:
        raise OverloadedError(f"stream {state.stream_id!r}: {len(queued)} frames already wait for ingest")
    engine.pruner.commit(state.pruning, plan)
    state.clock = max(state.clock, float(timestamps[-1]))  # pruned frames move the clock too
    entry = WaitingFrames(list(kept), kept_ts, time.monotonic(), done)
    if kept:
        state.deferred.append(entry)
    held = state.frames + state.waiting_frames
    if not kept:
        entry.settle(held)
    return held


def flush_waiting(engine, state: StreamState) -> None:
    """Ingest the stream's waiting frames now unless the step loop drives (it takes them under
    its budgets then); `StepLoop.ingest_before` does it, a failure logged there, not raised."""
    if not engine.loop.active:
        engine.loop.ingest_before(state)
