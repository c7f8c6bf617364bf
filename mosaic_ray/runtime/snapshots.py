"""Stream snapshots: a shard's periodic copy of a stream's engine state, and the log compaction
it allows; on the recovery side, the plan that imports a snapshot and replays only the log after it.

Why: replaying a whole log re-runs the vision encoder and prefill for every frame (an hour of
1-fps video: ~40 s+ on a GPU), and logs grow forever. With a snapshot every
`DurabilitySpec.snapshot_every_frames` acknowledged frames, a rebuild replays at most that many.

Taking one (`StreamSnapshots.take`), in this order:

1. under the stream's lock (no append, text, option or question of the stream runs meanwhile):
   `export_stream` on the engine thread (the path every engine call takes, FIFO), and the place
   of a `MarkRecord(mark, last_seq)` reserved in the stream's `LogOrder`, after every operation
   handed to the engine before the export. The mark is written, off the lock, once those
   before it are, with `last_seq` the seq of the last frame record written before it. The engine
   then held exactly the records before the mark (refused operations are not in the log), so
   "snapshot + records after the mark" is the stream, whatever text and option records sit
   between frame records.
2. off the lock: the export is serialized (`encode_snapshot`: torch.save of meta + tensors) and
   written to the store's snapshot slot (atomic: temp + fsync + rename), then read back and
   compared byte for byte.
3. under the lock again, only if the stream is still served here: the log is compacted to the
   records from the mark on (`FrameLog.truncate_before`), while no write of the stream's
   `LogOrder` runs (`LogOrder.exclusive`: frame records are written off the lock).

Invariants:
- The log is compacted only after its snapshot is durable and read back whole. A crash between
  any two steps leaves either a whole log (snapshot ignored or unused) or snapshot + tail.
- The snapshot is taken while the stream is admitted (`StreamSlot.admit`): a migration's freeze
  waits for it to finish, so a shard never compacts a log another shard writes. Deleting the
  stream waits for it too (`settle`).
- A log whose first record is an `OpenRecord` is whole. A compacted log starts with the mark of a
  snapshot that was durable when it was compacted.

Rebuilding (`plan_rebuild`): the snapshot is used when it reads back, decodes and its mark is in
the log; then only the records after the mark are replayed. Otherwise a whole log is replayed
whole (logged), and a compacted log raises `SnapshotLostError`: the stream's start is gone, and
serving what is left would answer from a truncated stream, so the router quarantines it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_ray.runtime.errors import SnapshotLostError
from mosaic_ray.runtime.frame_log import FrameLog, LogRecord, MarkRecord, OpenRecord, SnapshotCorruptError
from mosaic_ray.runtime.stream_slot import StreamSlot

log = logging.getLogger("mosaic_ray.runtime.snapshots")

SNAPSHOT_FORMAT = 1


def encode_snapshot(state: dict[str, Any], mark: int, last_seq: int) -> bytes:
    """An engine export ({"meta", "tensors"}) as bytes: torch.save keeps every dtype bit-exact."""
    out = io.BytesIO()
    torch.save({"format": SNAPSHOT_FORMAT, "mark": mark, "last_seq": last_seq,
                "meta": state["meta"], "tensors": state["tensors"]}, out)
    return out.getvalue()


def decode_snapshot(blob: bytes) -> tuple[int, int, dict[str, Any]]:
    """(mark, last_seq, engine state) of `encode_snapshot`'s bytes; plain data and tensors only."""
    body = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    if body.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotCorruptError(f"snapshot format {body.get('format')!r}, expected {SNAPSHOT_FORMAT}")
    return int(body["mark"]), int(body["last_seq"]), {"meta": body["meta"], "tensors": body["tensors"]}


@dataclass(slots=True)
class RebuildPlan:
    """What a rebuild does: import `state` (None: open an empty stream), then replay `records`."""

    state: dict[str, Any] | None
    last_seq: int  # the stream's seq once `state` is imported (-1 without one)
    records: list[LogRecord]
    mark: int | None  # the snapshot used
    whole: list[LogRecord] | None  # the whole log, when it is whole: the fallback if import fails
    problem: str = ""  # why a snapshot present was not used


def plan_rebuild(store: FrameLog, stream_id: str) -> RebuildPlan:
    """Read the stream's snapshot and log (blocking: run it on a thread)."""
    records = list(store.read(stream_id))
    whole = records if not records or isinstance(records[0], OpenRecord) else None
    problem = ""
    try:
        got = store.get_snapshot(stream_id)
    except SnapshotCorruptError as exc:
        got, problem = None, str(exc)
    if got is not None:
        mark, blob = got
        at = next((i for i in range(len(records) - 1, -1, -1)
                   if isinstance(records[i], MarkRecord) and records[i].mark == mark), None)
        if at is None:
            problem = f"its mark {mark} is not in the log (a stale snapshot)"
        else:
            try:
                got_mark, last_seq, state = decode_snapshot(blob)
                if got_mark != mark:
                    raise SnapshotCorruptError(f"snapshot holds mark {got_mark}, stored as {mark}")
                return RebuildPlan(state, last_seq, records[at + 1 :], mark, whole)
            except Exception as exc:  # unpickling errors have no common type
                problem = f"cannot decode it: {type(exc).__name__}: {exc}"
    return without_snapshot(stream_id, whole, problem)


def without_snapshot(stream_id: str, whole: list[LogRecord] | None, problem: str) -> RebuildPlan:
    """Full replay of a whole log; a compacted log without a usable snapshot is data loss."""
    if whole is None:
        log.error("stream %s: its log was compacted and its snapshot is unusable (%s): the records "
                  "before the snapshot are LOST; quarantining it", stream_id, problem or "no snapshot")
        raise SnapshotLostError(f"stream {stream_id!r}: log compacted and snapshot unusable "
                                f"({problem or 'no snapshot'}); its start is lost")
    if problem:
        log.error("stream %s: snapshot unusable (%s); replaying its whole log", stream_id, problem)
    return RebuildPlan(None, -1, whole, None, whole, problem)


class StreamSnapshots:
    """A shard's snapshot cadence. `note` after each acknowledged batch; `take` runs as a task,
    at most one per stream at a time; `settle` waits for a stream's before it is deleted.

    The cadence is approximate: frames are counted when their acknowledgement returns, after the
    stream's lock is released, so a batch applied just before a mark may count toward the next
    snapshot (at most one coalesced group early), and frames acknowledged while a snapshot is in
    flight wait for the next acknowledgement to start one."""

    def __init__(
        self, store: FrameLog, every_frames: int, call: Callable[..., Awaitable[Any]],
        export: Callable[[str], dict[str, Any]], owns: Callable[[str, StreamSlot], bool], hold_timeout_s: float,
        size: Callable[[str], int] | None = None, max_bytes: int = 0,
    ) -> None:
        if every_frames < 1:
            raise ValueError(f"every_frames must be >= 1, got {every_frames}")
        self._store, self.every_frames, self._call, self._export = store, every_frames, call, export
        self._owns, self._hold_timeout_s = owns, hold_timeout_s
        self._size, self.max_bytes = size, max_bytes  # streams over max_bytes are not snapshotted
        self.skipped = 0
        self._due: dict[str, int] = {}  # frames acknowledged since the stream's last mark
        self._tasks: dict[str, asyncio.Task] = {}
        self._last_mark = 0
        self.taken = 0
        self.failed = 0
        self.last: dict[str, dict[str, Any]] = {}  # per stream: the last snapshot's figures

    def note(self, slot: StreamSlot, frames: int) -> None:
        sid = slot.stream_id
        self._due[sid] = self._due.get(sid, 0) + frames
        if self._due[sid] >= self.every_frames and sid not in self._tasks:
            task = asyncio.get_running_loop().create_task(self.take(slot))
            self._tasks[sid] = task
            task.add_done_callback(lambda t: self._tasks.pop(sid) if self._tasks.get(sid) is t else None)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def restored(self, stream_id: str, frames_replayed: int) -> None:
        """A rebuilt stream: the frames replayed after its snapshot count toward the next."""
        self._due[stream_id] = frames_replayed

    async def settle(self, stream_id: str) -> None:
        task = self._tasks.get(stream_id)
        if task is not None:
            await asyncio.wait([task])
        self._due.pop(stream_id, None)
        self.last.pop(stream_id, None)

    async def take(self, slot: StreamSlot) -> dict[str, Any] | None:
        """Snapshot the stream and compact its log; None when it was not (moved, deleted, failed:
        the log stays whole up to the next try)."""
        sid = slot.stream_id
        try:
            async with slot.admit(self._hold_timeout_s):
                start = time.perf_counter()
                async with slot.lock:
                    if not self._owns(sid, slot):
                        return None
                    if self.max_bytes and self._size is not None:
                        nbytes = await self._call(self._size, sid)
                        if nbytes > self.max_bytes:
                            self.skipped += 1
                            self._due[sid] = 0
                            log.warning("stream %s: %d KV bytes > snapshot_max_bytes %d: no snapshot, its log "
                                        "stays whole", sid, nbytes, self.max_bytes)
                            return None
                    state = await self._call(self._export, sid)
                    mark = self._last_mark = max(time.time_ns(), self._last_mark + 1)
                    entry = slot.log_order.reserve()  # the mark's place: after what the export holds
                    slot.log_order.fill_mark(entry, lambda seq: MarkRecord(mark, seq))
                    self._due[sid] = 0
                await slot.log_order.durable(entry, self._writer(sid))  # off the lock: see LogOrder
                last_seq = entry.records[0].last_seq
                blob = await asyncio.to_thread(encode_snapshot, state, mark, last_seq)
                await asyncio.to_thread(self._write_verified, sid, mark, blob)
                async with slot.lock:
                    if not self._owns(sid, slot):
                        return None
                    dropped = await slot.log_order.exclusive(
                        lambda: asyncio.to_thread(self._store.truncate_before, sid, mark))
        except Exception as exc:  # EngineError (moved, busy, refused), OSError, serialization
            self.failed += 1
            log.warning("stream %s: snapshot not taken (%s: %s); its log stays whole", sid, type(exc).__name__, exc)
            return None
        self.taken += 1
        info = {"mark": mark, "last_seq": last_seq, "bytes": len(blob), "records_dropped": dropped,
                "seconds": time.perf_counter() - start}
        self.last[sid] = info
        return info

    def _writer(self, stream_id: str):
        store = self._store
        return lambda records: asyncio.to_thread(store.append, stream_id, records)

    def _write_verified(self, stream_id: str, mark: int, blob: bytes) -> None:
        self._store.put_snapshot(stream_id, mark, blob)
        back = self._store.get_snapshot(stream_id)
        if back is None or back[0] != mark or back[1] != blob:
            raise SnapshotCorruptError(f"snapshot of {stream_id!r} did not read back as written")
