"""IngestQueue: frame batches of a shard's streams, coalesced, deduplicated by seq, into the engine.

Batches of one stream that arrive while the engine is busy with that stream are coalesced into one
append (up to `max_coalesce_frames`): many small HTTP requests become few engine calls. Streams
drain independently, so a long question on one stream delays only that stream; appends of
different streams meet in the engine's step loop, which ingests them in one forward.

Invariants:
- A stream's batches reach the engine in arrival order, under the stream's lock (`StreamSlot`).
  With an engine that queues frames (`queued=True`: `append` returns once the frames' hand-over
  is queued on the engine's thread, without waiting for the engine to take them, and hands back
  what to await for them to be in), the lock covers the seq check, the log and the
  queueing only: a question of the stream does not wait for the step loop to ingest them (the
  engine ingests a stream's queued frames before its question, so the order is the same).
- seq: a batch whose seq equals the stream's `last_seq` is a replay: acknowledged, never appended;
  one below it is refused (`SeqConflictError`); a batch without seq gets `last_seq + 1`.
- A batch is acknowledged only after the engine holds its frames and, when the shard keeps frame
  logs, after its record is in the stream's log (written before the engine call: a batch the
  engine then refuses is refused again when the log is replayed). A failed append acknowledges
  nothing and leaves `last_seq` where it was. One bad batch fails alone: when a coalesced call
  fails, its batches are retried one by one.
- Frames queued on the shard never exceed `max_pending_frames`, nor one stream's queue
  `max_stream_pending_frames` (plus the batches the engine is taking, at most
  `max_coalesce_frames`): beyond, `ShardBusyError` (503 + Retry-After), nothing queued. A batch
  larger than a bound is taken when its queue is empty, so no batch is refused forever.
- Frames arrive compressed (`frame_codec`) and are decoded on `decode_threads` threads while they
  wait; a batch whose image data is corrupt fails alone (400), before the engine sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mosaic_ray.runtime.errors import SeqConflictError, ShardBusyError
from mosaic_ray.runtime.frame_codec import EncodedFrame, decode_all
from mosaic_ray.runtime.shard_metrics import ShardMeter
from mosaic_ray.runtime.stream_slot import FrameBatch, StreamSlot

# (stream_id, frames, timestamps) -> frames the stream holds, once they are in: `ShardActor._engine_append`;
# with `queued=True`, -> an awaitable of that, once the frames are queued in the engine.
AppendFn = Callable[[str, list[np.ndarray], list[float]], Awaitable[Any]]
# (stream_id, batches with their seq set) -> their records are in the stream's log.
LogFn = Callable[[str, list[FrameBatch]], Awaitable[None]]


class IngestQueue:
    def __init__(
        self, append: AppendFn, meter: ShardMeter, max_pending_frames: int, max_coalesce_frames: int,
        decode_threads: int = 4, log: LogFn | None = None, max_stream_pending_frames: int | None = None,
        queued: bool = False,
    ) -> None:
        self._append_to_engine, self._queued = append, queued
        self._log = log
        self._meter = meter
        self._decoders = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self.max_pending_frames = max_pending_frames
        self.max_stream_pending_frames = max_stream_pending_frames or max_pending_frames
        self.max_coalesce_frames = max_coalesce_frames
        self.pending_frames = 0

    async def submit(
        self, slot: StreamSlot, seq: int | None, frames: list[EncodedFrame | np.ndarray], timestamps: list[float]
    ) -> dict:
        """Queue one batch; return its acknowledgement once the engine holds it."""
        if self.pending_frames + len(frames) > self.max_pending_frames and self.pending_frames > 0:
            raise ShardBusyError("shard ingest queue is full", self.retry_after_s())
        queued = sum(b.count for b in slot.pending)
        if queued + len(frames) > self.max_stream_pending_frames and queued > 0:
            raise ShardBusyError(f"stream {slot.stream_id!r} ingest queue is full",
                                 _drain_time_s(queued, slot.ingest_rate.rate()))
        loop = asyncio.get_running_loop()
        if any(isinstance(f, EncodedFrame) for f in frames):
            decoded = loop.run_in_executor(None, decode_all, frames, self._decoders)
        else:  # already pixels: no thread hop
            decoded = loop.create_future()
            decoded.set_result(list(frames))
        batch = FrameBatch(seq, len(frames), timestamps, decoded, encoded=list(frames))
        slot.pending.append(batch)
        self.pending_frames += len(frames)
        if not slot.draining:
            slot.draining = True
            asyncio.get_running_loop().create_task(self._drain(slot))
        return await batch.done

    def retry_after_s(self) -> float:
        """Time for the queue to drain at the recent ingest rate, at least 1 s."""
        return _drain_time_s(self.pending_frames, self._meter.ingest.rate())

    async def _drain(self, slot: StreamSlot) -> None:
        try:
            while slot.pending:
                group = []
                for batch in self._take(slot):
                    try:
                        batch.frames = await batch.decoded
                        group.append(batch)
                    except Exception as exc:
                        self._fail(batch, exc)
                async with slot.lock:  # seq, log and the hand-over to the engine, in order
                    accepted, pending = await self._apply(slot, group)
                if accepted:  # the frames go in while the stream's other requests may run
                    await self._settle(slot, accepted, pending)
        finally:
            slot.draining = False

    def _take(self, slot: StreamSlot) -> list[FrameBatch]:
        """The longest prefix of the stream's queue within `max_coalesce_frames` (at least one)."""
        n, frames = 0, 0
        for batch in slot.pending:
            if n and frames + batch.count > self.max_coalesce_frames:
                break
            n, frames = n + 1, frames + batch.count
        group, slot.pending = slot.pending[:n], slot.pending[n:]
        return group

    async def _apply(self, slot: StreamSlot, group: list[FrameBatch]) -> tuple[list[FrameBatch], Any]:
        """Under the stream's lock: seq check, log, hand the accepted batches to the engine.
        Returns them and what to await for them to be in (or the exception the hand-over raised)."""
        accepted: list[FrameBatch] = []
        last = slot.last_seq
        for batch in group:
            seq = last + 1 if batch.seq is None else batch.seq
            if seq == last:
                self._resolve(batch, {"seq": seq, "frames_added": 0, "duplicate": True})
            elif seq < last:
                self._fail(batch, SeqConflictError(f"seq {seq} is below the last acknowledged seq {last}"))
            else:
                batch.seq, last = seq, seq
                accepted.append(batch)
        if not accepted:
            return [], None
        if self._log is not None:
            try:
                await self._log(slot.stream_id, accepted)
            except Exception as exc:  # not logged: nothing acknowledged, nothing appended
                for batch in accepted:
                    self._fail(batch, exc)
                return [], None
        return accepted, await self._hand_over(slot, accepted)

    async def _hand_over(self, slot: StreamSlot, batches: list[FrameBatch]) -> Any:
        """Give the batches' frames to the engine: an awaitable of the frames the stream then
        holds (or the exception raised on the way)."""
        frames = [f for b in batches for f in b.frames]
        stamps = [t for b in batches for t in b.timestamps]
        try:
            out = await self._append_to_engine(slot.stream_id, frames, stamps)
        except Exception as exc:
            return exc
        return out if self._queued else completed(out)

    async def _settle(self, slot: StreamSlot, accepted: list[FrameBatch], pending: Any) -> None:
        """Wait for the handed-over frames; acknowledge them, or isolate the bad batch: when a
        coalesced hand-over fails, its batches go in again one by one, in order."""
        try:
            await self._finish(slot, accepted, pending)
            return
        except Exception as exc:
            if len(accepted) == 1:
                self._fail(accepted[0], exc)
                return
        for batch in accepted:
            async with slot.lock:
                one = await self._hand_over(slot, [batch])
            try:
                await self._finish(slot, [batch], one)
            except Exception as one_exc:
                self._fail(batch, one_exc)

    async def _finish(self, slot: StreamSlot, batches: list[FrameBatch], pending: Any) -> None:
        if isinstance(pending, BaseException):
            raise pending
        held = await pending
        frames = sum(len(b.frames) for b in batches)
        slot.last_seq = batches[-1].seq
        slot.ingest_rate.add(frames)
        self._meter.frames_added(frames)
        for b in batches:
            self._resolve(b, {"seq": b.seq, "frames_added": len(b.frames), "duplicate": False, "frames_total": held})

    def _resolve(self, batch: FrameBatch, ack: dict) -> None:
        self.pending_frames -= batch.count
        if not batch.done.done():
            batch.done.set_result(ack)

    def _fail(self, batch: FrameBatch, exc: BaseException) -> None:
        self.pending_frames -= batch.count
        if not batch.done.done():
            batch.done.set_exception(exc)


async def completed(value: Any) -> Any:
    """An awaitable of `value`, for an `AppendFn` with `queued=True` whose frames are in already."""
    return value


def _drain_time_s(frames: int, rate: float) -> float:
    """Seconds for `frames` to drain at `rate` frames/s: 1 to 30 (1 when there is no rate yet)."""
    return max(1.0, min(30.0, frames / rate)) if rate > 0 else 1.0
