"""IngestQueue: frame batches of a shard's streams, coalesced, deduplicated by seq, into the engine.

Batches of one stream that arrive while the engine is busy with that stream are coalesced into one
append (up to `max_coalesce_frames`): many small HTTP requests become few engine calls. Streams
drain independently, so a long question on one stream delays only that stream; appends of
different streams meet in the engine's step loop, which ingests them in one forward.

Invariants:
- A stream's batches reach the engine in arrival order, under the stream's lock (`StreamSlot`).
  With an engine that queues frames (`queued=True`: `append` returns once the frames' hand-over
  is queued on the engine's thread, without waiting for the engine to take them, and hands back
  what to await for them to be in), the lock covers the seq check, the log's place and the
  queueing only: a question of the stream does not wait for the step loop to ingest them (the
  engine ingests a stream's queued frames before its question, so the order is the same).
- seq, decided once, under the lock: a batch whose seq is the stream's `last_seq`, or that of a
  batch still on its way in, is a replay, answered `duplicate: true` without appending, but only
  once the original is durable: it waits for the original's outcome and answers with it (its
  refusal too). Any other seq not above the last is refused (`SeqConflictError`); a batch
  without seq gets the next one. A refused batch consumes no seq: the next batch gets the same.
- A batch is acknowledged only after the engine holds its frames and, when the shard keeps frame
  logs, after its record is in the stream's log. The record is written once the engine took the
  frames (`LogOrder`: in the engine's order, only for what the engine accepted), so a refused
  batch is never in the log. A failed append acknowledges nothing and leaves `last_seq` where it
  was. One bad batch fails alone: when a coalesced call fails, its batches are retried one by
  one, each with its seq decided again. A log write that fails after the engine took the frames
  answers the store's error (503); the record is kept and written first by the next write, and
  a retry of that seq is acknowledged once it is written.
- Frames queued on the shard never exceed `max_pending_frames`, nor one stream's queue
  `max_stream_pending_frames` (plus the batches the engine is taking, at most
  `max_coalesce_frames`): beyond, `ShardBusyError` (503 + Retry-After), nothing queued. A batch
  larger than a bound is taken when its queue is empty, so no batch is refused forever.
- Timestamps are checked first (`record_check.check_times`: finite, within the stream clock's
  range): a batch outside fails alone (422), before anything is queued.
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
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame, decode_all
from mosaic_ray.runtime.durability.frame_log import LogRecord
from mosaic_ray.runtime.durability.log_order import LogEntry
from mosaic_ray.runtime.durability.record_check import check_times
from mosaic_ray.runtime.durability.shard_log import frame_record
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import FrameBatch, StreamSlot

# (stream_id, frames, timestamps) -> frames the stream holds, once they are in: `ShardActor._engine_append`;
# with `queued=True`, -> an awaitable of that, once the frames are queued in the engine.
AppendFn = Callable[[str, list[np.ndarray], list[float]], Awaitable[Any]]
# (stream_id, records) -> the records are in the stream's log (`ShardLog.write`).
LogFn = Callable[[str, list[LogRecord]], Awaitable[object]]


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
        self._waiting: set[asyncio.Task] = set()  # duplicates waiting for their original's log write

    async def submit(
        self, slot: StreamSlot, seq: int | None, frames: list[EncodedFrame | np.ndarray], timestamps: list[float]
    ) -> dict:
        """Queue one batch; return its acknowledgement once the engine holds it."""
        check_times(timestamps)  # before anything is queued: a time the engine cannot use is 422
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
        batch = FrameBatch(seq, len(frames), timestamps, decoded, encoded=list(frames), requested=seq)
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
                async with slot.lock:  # seq, the log's place and the hand-over to the engine, in order
                    accepted, entry, pending = await self._apply(slot, group)
                if accepted:  # the frames go in while the stream's other requests may run
                    await self._settle(slot, accepted, entry, pending)
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

    async def _apply(
        self, slot: StreamSlot, group: list[FrameBatch]
    ) -> tuple[list[FrameBatch], LogEntry | None, Any]:
        """Under the stream's lock: seq check, the batches' place in the log, the hand-over to the
        engine. Returns the accepted batches, their log entry and what to await for them to be in
        (or the exception the hand-over raised)."""
        accepted: list[FrameBatch] = []
        last = slot.last_seq
        for batch in group:
            seq = last + 1 if batch.requested is None else batch.requested
            if seq <= last:
                if self._known(slot, seq, accepted):
                    self._duplicate(slot, batch, seq, accepted)
                else:
                    self._fail(batch, SeqConflictError(f"seq {seq} is below the last acknowledged seq {last}"))
            else:
                batch.seq, last = seq, seq
                accepted.append(batch)
        if not accepted:
            return [], None, None
        entry = slot.log_order.reserve() if self._log is not None else None
        return accepted, entry, await self._hand_over(slot, accepted)

    def _known(self, slot: StreamSlot, seq: int, accepted: list[FrameBatch]) -> bool:
        """`seq` is the stream's last, or a batch on its way in (this group, or held by the engine
        while its log write is retried): a resend of it is a duplicate, not a conflict."""
        return (seq == slot.last_seq or any(b.seq == seq for b in accepted)
                or (self._log is not None and slot.log_order.unwritten(seq) is not None))

    def _duplicate(self, slot: StreamSlot, batch: FrameBatch, seq: int, accepted: list[FrameBatch]) -> None:
        """Answer a replayed seq with the original's outcome, once the original is durable."""
        ack = {"seq": seq, "frames_added": 0, "duplicate": True}
        original = next((b for b in accepted if b.seq == seq), None)
        if original is not None:  # on its way in with this group
            original.done.add_done_callback(lambda done: self._follow(batch, done, ack))
            return
        entry = slot.log_order.unwritten(seq) if self._log is not None else None
        if entry is None:
            self._resolve(batch, ack)
            return

        async def once_durable() -> None:  # the engine holds it; its log write failed before
            try:
                await slot.log_order.durable(entry, self._writer(slot))
            except Exception as exc:
                self._fail(batch, exc)
            else:
                self._resolve(batch, ack)

        task = asyncio.get_running_loop().create_task(once_durable())
        self._waiting.add(task)  # held: the loop keeps only weak references to tasks
        task.add_done_callback(self._waiting.discard)

    def _follow(self, batch: FrameBatch, done: asyncio.Future, ack: dict) -> None:
        """The original's outcome is the duplicate's. An original without seq whose seq moved
        (a batch before it in a retried group was refused) is not the batch the duplicate named."""
        if done.cancelled() or done.exception() is not None:
            self._fail(batch, done.exception() if not done.cancelled() else asyncio.CancelledError())
        elif done.result()["seq"] != ack["seq"]:
            self._fail(batch, SeqConflictError(f"seq {ack['seq']} was not taken; send it again"))
        else:
            self._resolve(batch, ack)

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

    async def _settle(self, slot: StreamSlot, accepted: list[FrameBatch], entry: LogEntry | None, pending: Any) -> None:
        """Wait for the handed-over frames; acknowledge them, or isolate the bad batch: when a
        coalesced hand-over fails, its batches go in again one by one, in order, each with its
        seq decided again (a batch without seq after a refused one takes the refused one's)."""
        try:
            await self._finish(slot, accepted, entry, pending)
            return
        except Exception as exc:
            if len(accepted) == 1:
                self._fail(accepted[0], exc)
                return
        for batch in accepted:
            async with slot.lock:
                one, one_entry, one_pending = await self._apply(slot, [batch])
            if not one:
                continue
            try:
                await self._finish(slot, one, one_entry, one_pending)
            except Exception as one_exc:
                self._fail(batch, one_exc)

    async def _finish(self, slot: StreamSlot, batches: list[FrameBatch], entry: LogEntry | None, pending: Any) -> None:
        """Raises when the engine did not take the frames (nothing of them stays: the entry is
        dropped); a log write that fails after the engine took them fails the batches here."""
        try:
            if isinstance(pending, BaseException):
                raise pending
            held = await pending
        except BaseException:
            if entry is not None:
                slot.log_order.drop(entry)
            raise
        frames = sum(len(b.frames) for b in batches)
        slot.last_seq = batches[-1].seq  # the engine holds them, durable or not yet
        slot.ingest_rate.add(frames)
        self._meter.frames_added(frames)
        if entry is not None:
            slot.log_order.fill(entry, [frame_record(b.seq, b.encoded, b.timestamps) for b in batches])
            try:
                await slot.log_order.durable(entry, self._writer(slot))
            except Exception as exc:
                for b in batches:
                    self._fail(b, exc)
                return
        for b in batches:
            self._resolve(b, {"seq": b.seq, "frames_added": len(b.frames), "duplicate": False, "frames_total": held})

    def _writer(self, slot: StreamSlot):
        log, sid = self._log, slot.stream_id
        return lambda records: log(sid, records)

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
