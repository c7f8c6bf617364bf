"""StreamEngine: one model on one device serving many live streams.

    open_stream -> append_frames / append_text (chunked prefill over sink + window + chunk; tokens
    leaving the window go to the stream's retriever) -> ask (prefill with per-layer retrieval, then
    decode; questions of several streams step together) -> close_stream

A step: reserve device-pool slots for the new tokens -> one forward (`model_runner`: every
sequence packed into one row; decode steps replay a CUDA graph) -> choose tokens (greedy rows in
one device-to-host copy) -> commit (the streams adopt their slots); frames and text go through
`ingest_step`, questions through `question_step`. Frames of several streams given to
`append_frames_batch` share one vision batch and one forward; every active question takes one step
per engine step, all in one forward.

Atomicity: inputs are validated before anything changes; a stream's counters move only after its
cache adopted the step's slots (`stream_state.commit`); a failed step gives its slots back, so a
failing call leaves the stream as it was. Frames keep flowing while a stream answers: they wait only
for the question's prefill step (bounded), then are ingested while the answer decodes, at positions
after the answer's reserved range (`engine/question.py`), so no acknowledged frame is lost or
reordered and the answer is the one the stream gave at the question's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from mosaic_ray.cache.device_pool import DeviceKVPool, DevicePoolExhaustedError
from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import EngineConfig
from mosaic_ray.engine import engine_report, frame_append, ingest_step
from mosaic_ray.engine.interface import (AnswerEnd, AskRequest, Engine, InvalidInputError, OverloadedError,
                                         StreamBusyError, StreamExistsError, UnknownStreamError)
from mosaic_ray.engine.frame_pruner import FramePruner
from mosaic_ray.engine.model_runner import ModelRunner
from mosaic_ray.engine.prefetch import Prefetcher
from mosaic_ray.engine.question_step import QuestionStepper
from mosaic_ray.engine.question import Answer, QuestionRun
from mosaic_ray.engine.step_loop import StepLoop
from mosaic_ray.engine.stream_state import StreamState, commit
from mosaic_ray.model.adapter import ModelAdapter
from mosaic_ray.model.attention import AttentionObserver


def _counts_busy(method):
    """Add the time of the outermost piece of engine work to `busy_s` (nested calls count once):
    the shard's measured capacity (`runtime/actors/capacity.py`)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        self._busy_depth += 1
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy_depth -= 1
            if self._busy_depth == 0:
                self.busy_s += time.perf_counter() - t0
    return timed


class StreamEngine(Engine):
    appends_during_answers = True  # engine/question.py: reserved positions, held slots
    def __init__(self, config: EngineConfig | None = None, adapter: ModelAdapter | None = None, *,
                 cache_observer: CacheObserver | None = None, attention_observer: AttentionObserver | None = None) -> None:
        """cache_observer: given to every stream cache this engine makes (`cache/observer.py`);
        attention_observer: `ModelRunner.attention_observer` (`model/attention.py`). None: no calls."""
        from mosaic_ray.model.registry import load_model

        self.config = config or EngineConfig()
        self.device = torch.device(self.config.resolved_device())
        self.adapter = adapter or load_model(self.config.model, self.device, self.config.dtype, self.config.frame_size, self.config.seed)
        self.layout = self.adapter.layout
        if self.config.prefetch:
            Prefetcher.install(self.adapter)
        self.pool = HostPool(self.layout, self.config.cache.pool)
        # after the weights, so a GPU pool is sized from the memory they leave free
        self.kv_pool = DeviceKVPool(self.layout, self.device, self.config.kv_pool)
        self.max_streams = self.config.check_pool_room(self.kv_pool.num_slots)  # a sink + window for each
        self.runner = ModelRunner(self.adapter, self.kv_pool, self.config)
        self.runner.attention_observer, self.cache_observer = attention_observer, cache_observer
        self.runner.capture_graphs()
        self.questions = QuestionStepper(self.adapter, self.runner, self.kv_pool, self.config)
        self.pruner = FramePruner(self.config.pruning)
        self.streams: dict[str, StreamState] = {}
        self._runs: list[QuestionRun] = []
        self._driver: asyncio.Task | None = None
        self.loop = StepLoop(self)  # drives ask / submit_frames under the step scheduler
        self.last_frame_tokens = 0  # decoder tokens of the last frame ingested (the scheduler's cost)
        self.busy_s = 0.0  # seconds spent working (vision, forwards, sampling, commits): capacity
        self._busy_depth = 0
        self.counters = {"frames": 0, "texts": 0, "questions": 0, "tokens": 0}
        # [tokens, copies, bytes] the questions' retrievals moved from the host pool (`engine_report`)
        self.retrieval = torch.zeros(3, dtype=torch.int64, device=self.device)

    @classmethod
    def from_spec(cls, **spec) -> "StreamEngine":
        """Build from plain data (what a Ray actor receives): EngineConfig fields (pydantic's
        ValidationError names each wrong one by its path, e.g. `cache.retreival`)."""
        return cls(EngineConfig.model_validate(spec))

    # ------------------------------------------------------------------ streams
    def _new_cache(self) -> StreamCache:
        return StreamCache(self.layout, self.config.cache, self.pool, self.device, self.kv_pool, self.cache_observer)

    def _get(self, stream_id: str) -> StreamState:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise UnknownStreamError(f"stream {stream_id!r} not found") from None

    def open_stream(self, stream_id: str) -> None:
        if not isinstance(stream_id, str) or not stream_id:
            raise InvalidInputError("stream id must be a non-empty string")
        if stream_id in self.streams:
            raise StreamExistsError(f"stream {stream_id!r} already exists")
        if len(self.streams) >= self.max_streams:
            raise OverloadedError(f"engine holds its maximum of {self.max_streams} streams")
        state = StreamState(stream_id, self._new_cache(), pruning=self.pruner.new_state())
        prefix = self.adapter.prefix_text()
        if prefix:
            self._ingest([(state, [self.adapter.text_chunk(prefix)], [0.0])])
        self.streams[stream_id] = state

    def close_stream(self, stream_id: str) -> None:
        state = self._get(stream_id)
        if state.busy:
            raise StreamBusyError(f"stream {stream_id!r} is answering a question")
        for w in state.deferred:  # their senders learn the stream is gone
            w.settle(error=UnknownStreamError(f"stream {stream_id!r} was closed"))
        state.cache.release()
        del self.streams[stream_id]

    def has_stream(self, stream_id: str) -> bool:
        return stream_id in self.streams

    def list_streams(self) -> list[str]:
        return list(self.streams)

    def configure_stream(self, stream_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Per-stream options (`frame_pruner.OPTIONS`: pruning, prune_threshold); returns them all."""
        return self.pruner.configure(self._get(stream_id).pruning, options)

    def frames_pruned(self, stream_id: str) -> int:
        """Frames of the stream pruned so far (0 for an unknown stream; a plain read, any thread)."""
        state = self.streams.get(stream_id)
        return state.pruning.pruned if state is not None else 0

    # ------------------------------------------------------------------ ingest
    def append_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        return self.append_frames_batch([(stream_id, frames, timestamps)])[0]

    def append_frames_batch(self, items: list[tuple[str, list[np.ndarray], list[float]]]) -> list[int]:
        """Frames of several streams in one vision batch and one decoder forward (`frame_append`)."""
        return frame_append.append_frames_batch(self, items)

    def submit_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        """Queue frames for the step loop (the serving path; `frame_append.submit_frames`)."""
        held = frame_append.submit_frames(self, self._get(stream_id), frames, timestamps)
        self._kick()
        return held

    async def ingest_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> int:
        """The serving path's append: the frames are queued for the step loop (validated and
        pruned now, `frame_append.submit_frames`), which ingests those of every stream together
        under the scheduler's budgets; returns the frames the stream holds once these are
        ingested. A failed ingest raises here and leaves them out of the stream."""
        return await self.queue_frames(stream_id, frames, timestamps)

    def queue_frames(self, stream_id: str, frames: list[np.ndarray], timestamps: list[float]) -> asyncio.Future:
        """`ingest_frames` in two halves (the shard's): queue the frames now (a bad batch raises
        here), and return the future of what `ingest_frames` returns. A question, text or snapshot
        of the stream asked after this call comes after these frames. Call on the engine's loop."""
        done = asyncio.get_running_loop().create_future()
        frame_append.submit_frames(self, self._get(stream_id), frames, timestamps, done)
        self._kick()
        return done

    def _kick(self) -> None:
        """Start the step loop on the running event loop if it is not driving already."""
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self.loop.run())

    @_counts_busy
    def _ingest_frames(self, ready) -> None:
        """Frames of several streams: one vision batch, then `_ingest` (`ingest_step.ingest_frames`)."""
        ingest_step.ingest_frames(self, ready)

    def append_text(self, stream_id: str, text: str, timestamp: float) -> None:
        state = self._get(stream_id)
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("text must be a non-empty string")
        frame_append.check_time(timestamp, "text")
        if state.awaiting_prefill:
            raise StreamBusyError(f"stream {stream_id!r} is starting to answer a question; retry shortly")
        if not self.loop.ingest_before(state):  # the text comes after the frames it follows
            raise OverloadedError(f"stream {stream_id!r}: frames waiting for ingest could not be ingested; retry")
        chunk = self.adapter.text_chunk(self.adapter.caption_text(text, float(timestamp)))
        if chunk.size > self.config.max_question_tokens:
            raise InvalidInputError(f"text of {chunk.size} tokens exceeds the limit of {self.config.max_question_tokens}")
        self._ingest([(state, [chunk], [float(timestamp)])])
        state.texts += 1
        self.counters["texts"] += 1

    @_counts_busy
    def _ingest(self, work: list[tuple[StreamState, list, list[float]]]) -> None:
        """One decoder forward over each stream's chunks, then their commit (`ingest_step.ingest_chunks`)."""
        ingest_step.ingest_chunks(self, work)

    # ------------------------------------------------------------------ questions
    def _start(self, stream_id: str, request: AskRequest) -> QuestionRun:
        state, t_ask = self._get(stream_id), time.perf_counter()
        with record_function("question.start"):
            if not state.busy:  # the question sees every frame that came before it (a failure is logged)
                self.loop.ingest_before(state)
            run = self.questions.start(state, request)
        run.t_ask = t_ask
        return run

    @_counts_busy
    def _offload_staged(self, state: StreamState) -> bool:
        """The step loop's upkeep: offload `state`'s staged tokens when a batch has gathered
        (`StreamCache.offload_due`); True when it did. Counted as busy, as the forwards are: every
        stream's frames need it (it bounds device memory) and its cost grows with the streams, so
        capacity must see it. Splits are not counted: they refine clusters in the time left."""
        return bool(state.cache.offload_due and state.cache.offload())

    @_counts_busy
    def _advance(self, runs: list[QuestionRun]) -> list[str]:
        """One step for every run (prefill, decode or closing); returns each run's new text. Runs
        whose closing text is all fed after this step commit their Q/A to the stream."""
        closing = [r for r in runs if r.phase == "closing"]
        prefilled = [r for r in runs if r.phase == "prefill"]
        deltas = self.questions.step(runs)
        for run in prefilled:  # its context is retrieved: the stream's frames may enter again
            run.state.awaiting_prefill = False
            self._flush_deferred(run.state)
        for run in closing:
            if run.closed:
                self._commit_run(run)
        return deltas

    def _commit_run(self, run: QuestionRun) -> None:
        state, work = run.state, run.step.work
        n = work.used
        pos = torch.cat(run.pending_pos, 1)
        alone = state.next_pos == run.pos_base + run.pos_reserved  # nothing entered during the answer
        try:
            if alone:  # give the unused reserved positions back: the stream stays contiguous
                state.next_pos = run.pos_base
            commit(state, work.own[:n], torch.full((n,), run.clock), torch.full((n,), state.block, dtype=torch.long),
                   pos, run.pos_cursor - run.pos_base if alone else 0, 1,
                   seg_text=torch.ones(n, dtype=torch.bool))  # a Q/A turn is a text segment
        except BaseException:
            if alone:
                state.next_pos = run.pos_base + run.pos_reserved
            self._release(run)
            raise
        work.release(keep_own=True)  # the stream owns the Q/A's slots now
        if not self.loop.active:  # the Q/A's tokens may have flagged splits (the loop drains them later)
            state.cache.maintain(self.config.splits_per_step)
        state.questions += 1
        self.counters["questions"] += 1
        run.phase = "done"
        run.t_done = time.perf_counter()
        self._release(run)

    def _release(self, run: QuestionRun) -> None:
        if run.released:
            return
        run.released = True
        state = run.state
        moved = run.step.fetch_moved(run.row_bytes)
        if moved is not None:
            self.retrieval += moved
        state.busy = state.awaiting_prefill = False
        if run.phase != "done" and state.next_pos == run.pos_base + run.pos_reserved:
            state.next_pos = run.pos_base  # not committed and nothing came after: no gap
        if run.step.work is not None:
            run.step.work.release()
        run.step.prefetched.clear()
        state.cache.unhold()
        self._flush_deferred(state)

    def _flush_deferred(self, state: StreamState) -> None:
        frame_append.flush_waiting(self, state)

    def answer_batch(self, items: list[tuple[str, AskRequest]]) -> list[Answer]:
        """Answer questions of several streams together, synchronously (tests, benchmarks, CLI)."""
        runs = []
        try:
            for sid, req in items:
                runs.append(self._start(sid, req))
            active = list(runs)
            while active:
                self._advance(active)
                active = [r for r in active if r.phase != "done"]
        except BaseException:
            for r in runs:
                if r.phase != "done":
                    self._release(r)
            raise
        return [r.answer() for r in runs]

    def answer(self, stream_id: str, request: AskRequest) -> Answer:
        return self.answer_batch([(stream_id, request)])[0]

    async def ask(self, stream_id: str, request: AskRequest) -> AsyncIterator[str]:
        async with contextlib.aclosing(self.ask_until_end(stream_id, request)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield item

    async def ask_until_end(self, stream_id: str, request: AskRequest) -> AsyncIterator[str | AnswerEnd]:
        run = self._start(stream_id, request)
        run.queue = asyncio.Queue()
        self._runs.append(run)
        self._kick()
        try:
            while True:
                # the text that came since the last yield in one delta: an asker that reads slower
                # than the steps (one token each) gets what is there, not one hop per token
                text, item = [], await run.queue.get()
                while isinstance(item, str):
                    text.append(item)
                    if run.queue.empty():
                        break
                    item = run.queue.get_nowait()
                if text:
                    yield "".join(text)
                if item is None:  # the run is done: its finish reason and token counts are final
                    yield run.end()
                    return
                if isinstance(item, BaseException):
                    raise item
        finally:
            run.cancelled = True

    # ------------------------------------------------------------------ reporting
    def stream_info(self, stream_id: str) -> dict[str, Any]:
        return engine_report.stream_info(self, self._get(stream_id))

    def stats(self) -> dict[str, Any]:
        return engine_report.engine_stats(self)

    def export_stream(self, stream_id: str, since: int | None = None) -> dict[str, Any]:
        from mosaic_ray.engine.stream_export import export_stream

        state = self._get(stream_id)
        if state.busy:
            raise StreamBusyError(f"stream {stream_id!r} is answering a question")
        if not self.loop.ingest_before(state):  # a snapshot holds every frame it was given
            raise OverloadedError(f"stream {stream_id!r}: frames waiting for ingest could not be ingested; retry")
        snapshot = export_stream(state, since)
        meta, tensors = self.pruner.export(state.pruning)
        snapshot["meta"]["pruning"] = meta
        snapshot["tensors"].update(tensors)
        return snapshot

    def import_stream(self, stream_id: str, snapshot: dict[str, Any]) -> None:
        from mosaic_ray.engine.stream_export import import_stream

        if stream_id in self.streams:
            raise StreamExistsError(f"stream {stream_id!r} already exists")
        cache = self._new_cache()
        try:
            state = import_stream(stream_id, snapshot, cache)
            state.pruning = self.pruner.restore(snapshot["meta"].get("pruning"), snapshot["tensors"])
        except (PoolExhaustedError, DevicePoolExhaustedError, torch.OutOfMemoryError) as exc:
            # Capacity, not a bad snapshot: nothing of it stays; try later or elsewhere (a rebuild
            # must never take this for an unusable snapshot and fall back past a compaction).
            cache.release()
            raise OverloadedError(f"stream {stream_id!r}: no room to import its snapshot ({exc})") from None
        except BaseException:
            cache.release()
            raise
        self.streams[stream_id] = state

    def export_delta(self, stream_id: str, since: int) -> dict[str, Any]:
        """Only the host-pool slabs changed after pool epoch `since` (`engine/snapshot_delta.py`)."""
        return self.export_stream(stream_id, since)

    def import_deltas(self, stream_id: str, parts: list[dict[str, Any]]) -> None:
        from mosaic_ray.engine.snapshot_delta import merge_lazily

        if stream_id in self.streams:
            raise StreamExistsError(f"stream {stream_id!r} already exists")
        try:
            whole = merge_lazily(parts)  # the pool's slabs stay in their parts until the import
        except ValueError as exc:
            raise InvalidInputError(f"snapshot parts do not merge: {exc}") from None
        self.import_stream(stream_id, whole)
