"""The ingest step: frames or text of several streams -> (one vision batch) -> one decoder forward
-> each stream commits its new tokens (nano-vllm's schedule -> prepare -> forward -> commit, for
tokens that join the streams rather than answer a question).

    ingest_frames(engine, ready)   [(state, frames, timestamps)]: encode every frame in one batch,
                                   then `ingest_chunks`; counts the frames of the streams that went in
    ingest_chunks(engine, work)    [(state, chunks, timestamps)]: reserve device-pool slots, one
                                   forward, commit per stream (`stream_state.commit`)

Atomicity: the slots are reserved all or none; a failed forward gives them back and changes no
stream; a commit that fails at stream r leaves streams 0..r-1 committed and says so
(`frame_append.PartialCommitError(r)`), the others untouched. While the step loop drives, a
commit only stages what leaves the window: offloads and splits are its background upkeep;
without a loop, a bounded batch of upkeep runs after each stream's commit.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from mosaic_ray.cache.device_pool import DevicePoolExhaustedError
from mosaic_ray.cache.host_pool import PoolExhaustedError
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.engine.frame_append import PartialCommitError
from mosaic_ray.engine.interface import OverloadedError
from mosaic_ray.engine.stream_state import assemble, commit
from mosaic_ray.model.attention import StreamStep


def ingest_frames(engine, ready) -> None:  # engine: the StreamEngine (which owns this step: no import back up)
    all_frames = [f for _, frames, _ in ready for f in frames]
    with record_function("ingest.encode"):
        features = engine.adapter.encode_frames(all_frames)
    work, k = [], 0
    for state, frames, ts in ready:
        chunks = [engine.adapter.frame_chunk(features[k + i], ts[i]) for i in range(len(frames))]
        k += len(frames)
        if chunks:
            engine.last_frame_tokens = chunks[-1].size
        work.append((state, chunks, ts))
    try:
        engine._ingest(work)
    except PartialCommitError as exc:
        _count_frames(engine, ready[: exc.committed])
        raise
    _count_frames(engine, ready)


def _count_frames(engine, ready) -> None:
    for state, frames, _ in ready:
        state.frames += len(frames)
        engine.counters["frames"] += len(frames)


def ingest_chunks(engine, work) -> None:
    segs = [assemble(state, chunks, ts) for state, chunks, ts in work]
    slots = reserve([(state.cache, seg.size) for (state, _, _), seg in zip(work, segs)])
    steps = [StreamStep(state.cache, seg.size) for (state, _, _), seg in zip(work, segs)]
    try:
        with record_function("ingest.forward"):
            # frames attend their stream's resident slots only, every one valid: a dense step
            engine.runner.forward(segs, steps, [state.cache.slots for state, _, _ in work], slots, dense=True)
    except BaseException:
        for (state, _, _), sl in zip(work, slots):
            state.cache.discard(sl)
        raise
    for row, ((state, chunks, ts), seg) in enumerate(zip(work, segs)):
        try:
            with record_function("ingest.commit"):
                commit(state, slots[row], seg.time, seg.block, seg.positions, seg.span, len(chunks), clock=max(ts),
                       seg_text=seg.text)
        except Exception as exc:  # rows before this one are in: say so, or the caller retries them
            for (st, _, _), sl in zip(work[row:], slots[row:]):
                st.cache.discard(sl)
            err = exc
            if isinstance(exc, PoolExhaustedError):  # the host pool is full: capacity (a 503), not a fault
                err = OverloadedError(f"stream {state.stream_id!r}: frames not ingested, {exc}; retry later")
            if row == 0:
                raise err from (exc if err is not exc else None)
            raise PartialCommitError(row, err) from exc
        engine.counters["tokens"] += seg.size
        if engine.loop.active:  # the step loop drains splits between steps
            engine.loop.needs_maintenance.add(state.stream_id)
            continue
        try:  # deferred upkeep: a full pool leaves the splits queued for a later step
            state.cache.maintain(engine.config.splits_per_step)
        except PoolExhaustedError:
            pass
        except Exception as exc:
            for (st, _, _), sl in zip(work[row + 1:], slots[row + 1:]):
                st.cache.discard(sl)
            raise PartialCommitError(row + 1, exc) from exc


def reserve(needs: list[tuple[StreamCache, int]]) -> list[torch.Tensor]:
    """Device-pool slots for each stream's new tokens, all or none (a full pool is an overload)."""
    got: list[torch.Tensor] = []
    try:
        for cache, n in needs:
            got.append(cache.reserve(n))
    except DevicePoolExhaustedError as exc:
        for (cache, _), sl in zip(needs, got):
            cache.discard(sl)
        raise OverloadedError(str(exc)) from exc
    return got
