"""StepLoop: the engine's driver when it serves (questions from `ask`, frames from `submit_frames`):
each step asks the `StepScheduler` what to spend the budgets on, runs it, and does the planned
background work after it.

    build the scheduler's view (questions' needs, streams' waiting frames, streams with splits)
    -> plan -> one question step for the planned runs (prefill and decode together)
    -> one ingest forward for the planned frames of every stream (one vision batch)
    -> background upkeep (`maintenance_budget`): offloading a stream's staged tokens (one insert
       of `cache.offload_batch` or more; at most `offloads_per_step` streams while questions or
       frames wait, the most staged first), cluster splits (within `maintenance_share` of the
       loop's time while questions or frames wait); off every question's step

While the loop drives, commits (of frames and of finished answers) do not offload or split inline;
the streams that may need some are remembered and served here in turn. Frames that fail to ingest
go back to the front of their stream's queue when they were acknowledged on queueing (never
dropped), or fail their waiting sender (`StreamEngine.ingest_frames`) and are dropped; the error is
counted and the stream retried on a later step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Generator

from torch.profiler import record_function

from mosaic_ray.cache.host_pool import PoolExhaustedError
from mosaic_ray.engine import frame_append
from mosaic_ray.engine.scheduler import IngestWork, QuestionWork, StepScheduler
from mosaic_ray.engine.stream_state import WaitingFrames

logger = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_FRAME = 256  # until the first frame is ingested
RETRY_S = 0.05  # pause after a step that could do nothing (a failure that repeats)
# Event-loop turns `_deliver` gives up: a delta put in an answer's queue reaches the EngineRunner's
# cross-thread future in three (the asker's generator wakes, its `__anext__` returns, the future's
# done-callback runs); the shard's loop takes it from there.
DELIVERY_TURNS = 3
RECENT_TTFT = 4096  # first tokens kept for `ttft_parts`
RECENT_TTFT_S = 30.0


async def _deliver() -> None:
    for _ in range(DELIVERY_TURNS):
        await asyncio.sleep(0)


def finish(part: Generator[None, None, bool]) -> bool:
    """Run a step's part (`StepLoop._rest`) to its end without pausing; returns what it returns."""
    while True:
        try:
            next(part)
        except StopIteration as done:
            return done.value


class StepLoop:
    def __init__(self, engine) -> None:  # the StreamEngine it drives (which owns it: no import back up)
        self.engine = engine
        self.scheduler = StepScheduler(engine.config.scheduler)
        self.active = False  # True while `run` drives the engine
        self.needs_maintenance: set[str] = set()
        self.tokens_per_frame = DEFAULT_TOKENS_PER_FRAME
        self.wake_in_s: float | None = None  # the last plan's: when held-back frames become due
        self._busy = False  # the last plan's: questions or frames were waiting
        self._foreground_s = 0.0  # the last step's question seconds
        self.counters = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0, "ingest_tokens": 0,
                         "ingest_frames": 0, "ingest_steps": 0, "splits": 0, "offloads": 0, "offloaded_tokens": 0, "ingest_errors": 0,
                         # wall seconds of each part of the steps (host time, the GPU work it waits on included)
                         "question_s": 0.0, "ingest_s": 0.0, "maintenance_s": 0.0,
                         "offload_s": 0.0,  # the offloads' share of maintenance_s
                         # a question's time to its first token, in three parts (summed over
                         # `first_tokens` questions): its start (the stream's waiting frames
                         # ingested first), the wait for a step, the step that fed its prompt
                         "first_tokens": 0, "ttft_start_s": 0.0, "ttft_queue_s": 0.0, "ttft_prefill_s": 0.0}
        # (monotonic time, start_s, queue_s, prefill_s) of recent first tokens (`ttft_parts`)
        self.recent_ttft: deque[tuple[float, float, float, float]] = deque(maxlen=RECENT_TTFT)

    def has_work(self) -> bool:
        e = self.engine
        return bool(e._runs) or any(s.deferred for s in e.streams.values()) or bool(self.needs_maintenance)

    async def run(self) -> None:
        self.active = True
        try:
            while self.has_work():
                try:
                    plan, runs = self._plan()
                    progressed = self._run_questions(runs)
                    if runs:
                        # hand the new tokens to their askers before the step's ingest: a first
                        # token must not wait for a vision batch (~100-200 ms at 64 streams)
                        await _deliver()
                    rest = self._rest(plan)
                    while True:  # the other calls of the engine's thread run where it pauses
                        try:
                            next(rest)
                        except StopIteration as done:
                            progressed |= done.value
                            break
                        await asyncio.sleep(0)
                except Exception as err:  # a bug of ours must not leave an answer waiting forever
                    logger.exception("engine step failed")
                    self._fail(list(self.engine._runs), err)
                    progressed = False
                # yield to the engine thread's other calls; back off while a failure repeats or
                # until held-back frames are due
                await asyncio.sleep(0 if progressed else min(RETRY_S, self.wake_in_s or RETRY_S))
        finally:
            self.active = False

    def _fail(self, runs, err: BaseException) -> None:
        """Runs whose step failed: released, and the error handed to whoever waits on them."""
        e = self.engine
        for run in runs:
            e._runs.remove(run)
            if run.phase != "done":
                e._release(run)
            if run.queue is not None:
                run.queue.put_nowait(err)

    def step(self) -> bool:
        """One scheduled step (also callable without a loop: tests, tools); False when it could do
        nothing (all its work failed or waits)."""
        plan, runs = self._plan()
        progressed = self._run_questions(runs)
        return finish(self._rest(plan)) or progressed

    # ------------------------------------------------------------------ the parts of a step
    # plan, questions, then the rest (ingest, upkeep: `_rest`). `run` yields to the engine's event
    # loop between them (the askers get their tokens) and where `_rest` pauses; other calls may
    # run there (a new question's start, a stream closed), so what follows re-reads what it
    # needs: streams gone are skipped, frames already taken are not taken twice.
    def _plan(self):
        e, now = self.engine, time.monotonic()
        questions = [QuestionWork(id(run), run.state.stream_id, run.phase, len(run.next_ids()),
                                  run.request.priority == "interactive", run.t_start) for run in e._runs]
        ingest = [IngestWork(s.stream_id, s.waiting_frames, self.tokens_per_frame,
                             s.oldest_waiting, blocked=s.awaiting_prefill)
                  for s in e.streams.values() if s.deferred]
        splits = {sid: e.config.scheduler.maintenance_budget for sid in self.needs_maintenance if sid in e.streams}
        plan = self.scheduler.schedule(questions, ingest, now, splits, open_streams=len(e.streams))
        self.wake_in_s = plan.wake_in_s
        self.counters["steps"] += 1
        for key in ("decode_tokens", "prefill_tokens", "ingest_tokens"):
            self.counters[key] += getattr(plan, key)
        planned = set(plan.questions)
        self._busy = bool(e._runs or ingest)
        return plan, [r for r in e._runs if id(r) in planned]

    def _run_questions(self, runs) -> bool:
        t0 = time.perf_counter()
        if runs:
            with record_function("step.questions"):
                self._questions(runs)
        self._foreground_s = time.perf_counter() - t0
        self.counters["question_s"] += self._foreground_s
        return bool(runs)

    def _rest(self, plan) -> Generator[None, None, bool]:
        """The step's ingest, then its upkeep; returns whether it progressed. It pauses (yields)
        after the ingest and after each offload (50-90 ms each at 64-96 7b-shape streams on an
        H200): `run` lets the thread's waiting calls in there (a question's start, frames handed
        over), so a question waits for a piece of a step, not a whole one. What a pause may
        change is re-read after it: streams gone are skipped (`_maintain`)."""
        e, c, progressed = self.engine, self.counters, False
        t1 = time.perf_counter()
        take = {sid: min(n, e.streams[sid].waiting_frames) for sid, n in plan.ingest.items()
                if sid in e.streams and e.streams[sid].deferred and not e.streams[sid].awaiting_prefill}
        if take:
            with record_function("step.ingest"):
                progressed |= self._ingest(take)
            c["ingest_steps"] += 1
        ingest_s = time.perf_counter() - t1
        c["ingest_s"] += ingest_s
        if take:
            yield
        upkeep_s = 0.0  # this step's own upkeep time, the pauses left out
        may_offload = self._offload_turns(plan.maintenance, busy=self._busy)
        for sid, n in plan.maintenance.items():
            t = time.perf_counter()
            splits_ok = plan.split_time_s is None or upkeep_s < plan.split_time_s
            with record_function("step.maintenance"):
                progressed |= self._maintain(sid, n, splits=splits_ok, offload=sid in may_offload)
            upkeep_s += time.perf_counter() - t
            if sid in may_offload:
                yield
        self.scheduler.note_step(self._foreground_s + ingest_s, upkeep_s)
        c["maintenance_s"] += upkeep_s
        return progressed

    def ingest_before(self, state) -> bool:
        """Ingest `state`'s waiting frames now (a question, text or snapshot of that stream comes
        after them; or no loop drives: `frame_append.flush_waiting`), with
        the waiting frames of the other streams in the same forwards while the encoder budget
        lasts: a forward of 16 frames costs ~2x one of 1-2 (launch-bound), and theirs would need
        one soon. Returns True when none of `state`'s frames waits (a failure is logged by `_ingest`)."""
        e, budget = self.engine, max(1, self.engine.config.scheduler.encoder_budget)
        for _ in range(64):  # bounded: a stream whose frames keep failing does not hold the question
            if not state.deferred or state.awaiting_prefill:
                break
            take = {state.stream_id: min(state.waiting_frames, budget)}
            room = budget - take[state.stream_id]
            others = sorted((s for s in e.streams.values() if s is not state and s.deferred and not s.awaiting_prefill),
                            key=lambda s: s.oldest_waiting)
            for s in others:
                if room <= 0:
                    break
                take[s.stream_id] = min(s.waiting_frames, room)
                room -= take[s.stream_id]
            self.scheduler.note_ingest(time.monotonic())
            if not self._ingest(take):
                break
            self.counters["ingest_steps"] += 1
        return not state.deferred

    # ------------------------------------------------------------------ parts of a step
    def _questions(self, runs) -> None:
        e, t0 = self.engine, time.perf_counter()
        for run in runs:
            if run.t_planned is None:
                run.t_planned = t0
        try:
            deltas = e._advance(runs)
        except Exception as err:  # the step failed for all of them
            self._fail(runs, err)
            return
        for run, delta in zip(runs, deltas):
            if run.t_first is not None and run.t_planned is not None and len(run.generated) == 1:
                self._note_first_token(run)
            if delta and run.queue is not None:
                run.queue.put_nowait(delta)
            if run.phase == "done":
                e._runs.remove(run)
                self.needs_maintenance.add(run.state.stream_id)
                if run.queue is not None:
                    run.queue.put_nowait(None)

    def _note_first_token(self, run) -> None:
        c = self.counters
        start = run.t_start - (run.t_ask if run.t_ask is not None else run.t_start)
        queue, prefill = run.t_planned - run.t_start, run.t_first - run.t_planned
        c["first_tokens"] += 1
        c["ttft_start_s"] += start
        c["ttft_queue_s"] += queue
        c["ttft_prefill_s"] += prefill
        self.recent_ttft.append((time.monotonic(), start, queue, prefill))

    def ttft_parts(self, window_s: float = RECENT_TTFT_S) -> dict[str, object]:
        """p50 / p99 (ms) of each part of the time to a first token, over the questions whose
        first token came in the last `window_s` seconds (at most `RECENT_TTFT` of them)."""
        since = time.monotonic() - window_s
        rows = [r for r in self.recent_ttft if r[0] >= since]
        out: dict[str, object] = {"n": len(rows), "window_s": window_s}
        for i, name in enumerate(("start", "queue", "prefill"), start=1):
            xs = sorted(r[i] for r in rows)
            out[name] = ({"p50_ms": 1e3 * xs[len(xs) // 2], "p99_ms": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]}
                         if xs else {"p50_ms": 0.0, "p99_ms": 0.0})
        return out

    def _ingest(self, take: dict[str, int]) -> bool:
        e = self.engine
        ready, popped = [], []
        for sid, n in take.items():
            state = e.streams[sid]
            pieces = []
            while n > 0 and state.deferred:
                head = state.deferred[0]
                k = min(n, len(head.frames))
                if k == len(head.frames):
                    pieces.append(state.deferred.pop(0))
                else:  # the rest of the entry waits for a later step; its `done` settles then
                    pieces.append(WaitingFrames(head.frames[:k], head.timestamps[:k], head.arrived, head.done, last=False))
                    head.frames, head.timestamps = head.frames[k:], head.timestamps[k:]
                n -= k
            ready.append((state, [f for p in pieces for f in p.frames], [float(t) for p in pieces for t in p.timestamps]))
            popped.append(pieces)
        before = self._offloads([s for s, _, _ in ready])
        try:
            e._ingest_frames(ready)
            done = len(ready)
        except frame_append.PartialCommitError as exc:
            done = exc.committed
            self._failed(ready[done:], popped[done:], exc.cause)
        except Exception as exc:
            done = 0
            self._failed(ready, popped, exc)
        self._count_offloads([s for s, _, _ in ready], before)  # inline ones (upkeep fell behind)
        for (state, frames, _), pieces in zip(ready[:done], popped[:done]):
            self.needs_maintenance.add(state.stream_id)
            self.counters["ingest_frames"] += len(frames)
            held = state.frames + state.waiting_frames
            for p in pieces:
                p.settle(held)
        if done and e.last_frame_tokens:
            self.tokens_per_frame = e.last_frame_tokens
        return done > 0

    def _failed(self, ready, popped, exc: BaseException) -> None:
        """Frames that could not be ingested: those acknowledged when queued go back to the front
        of their queue (never dropped); those whose sender waits (`done`) fail with the error and
        are dropped, with the rest of a split entry."""
        self.counters["ingest_errors"] += 1
        logger.warning("ingest of %d streams failed (%r); their frames stay queued", len(ready), exc)
        for (state, _, _), pieces in zip(ready, popped):
            for p in pieces:
                p.settle(error=exc)
            if pieces and not pieces[-1].last and pieces[-1].done is not None:
                state.deferred.pop(0)  # the rest of the failed entry
            state.deferred[:0] = [p for p in pieces if p.done is None]

    @staticmethod
    def _offloads(states) -> list[tuple[int, int]]:
        return [(s.cache.offloads, s.cache.offloaded_tokens) for s in states]

    def _count_offloads(self, states, before) -> int:
        """Add the offloads the caches made since `before` to the counters; returns how many."""
        n = 0
        for s, (count, tokens) in zip(states, before):
            n += s.cache.offloads - count
            self.counters["offloaded_tokens"] += s.cache.offloaded_tokens - tokens
        self.counters["offloads"] += n
        return n

    def _offload_turns(self, planned: dict[str, int], busy: bool) -> set[str]:
        """The streams whose due offload may run in this upkeep: all of them when nothing waits,
        else the `offloads_per_step` with the most staged tokens, plus every stream with twice its
        `offload_batch` staged (it nears the inline bound)."""
        streams = self.engine.streams
        due = [sid for sid in planned if sid in streams and streams[sid].cache.offload_due]
        limit = self.scheduler.config.offloads_per_step
        if not busy or not limit or len(due) <= limit:
            return set(due)
        due.sort(key=lambda sid: -streams[sid].cache.staged_tokens)
        urgent = {sid for sid in due if streams[sid].cache.staged_tokens >= 2 * streams[sid].cache.config.offload_batch}
        return set(due[:limit]) | urgent

    def _maintain(self, sid: str, n: int, splits: bool = True, offload: bool = True) -> bool:
        """Up to n units of `sid`'s upkeep: its offload when one is due and `offload` allows it,
        then splits unless `splits` is False (they wait: `SchedulerConfig.maintenance_share`). A
        stream whose due offload was held back stays queued for a later upkeep."""
        state = self.engine.streams.get(sid)
        if state is None:
            self.needs_maintenance.discard(sid)
            return False
        held_back = state.cache.offload_due and not offload
        if not splits and not (offload and state.cache.offload_due):
            return False
        before = self._offloads([state])
        try:
            done = 0
            if offload:
                t0 = time.perf_counter()
                done = int(self.engine._offload_staged(state))  # counted in the engine's busy time
                self.counters["offload_s"] += time.perf_counter() - t0
            if splits and n > done:
                done += state.cache.maintain(n - done, offload=not held_back)
        except PoolExhaustedError:  # the staged tokens and splits stay queued; a later step retries
            return False
        self.counters["splits"] += done - self._count_offloads([state], before)
        if done < n and splits and not held_back:  # drained
            self.needs_maintenance.discard(sid)
        return True
