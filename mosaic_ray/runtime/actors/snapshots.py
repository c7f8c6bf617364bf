"""Stream snapshots: a shard's periodic copy of a stream's engine state, and the log compaction
it allows (the rebuild side, which imports the parts and replays only the log after them, is
`snapshot_plan.py`).

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
2. off the lock: the export is serialized as it is written (`encode_chunks`: a header, then each
   tensor's bytes in pieces of at most `CHUNK_BYTES`, none joined) to the store's snapshot slot
   (atomic: temp + fsync + rename), its length and crc32 counted on the way (`CrcTally`); then
   read back, chunk by chunk, and its length and crc32 compared with those. Memory: the export's
   tensors (the engine's copies) and one chunk, whatever the stream's size.
3. under the lock again, only if the stream is still served here: the log is compacted to the
   records from the mark on (`FrameLog.truncate_before`), while no write of the stream's
   `LogOrder` runs (`LogOrder.exclusive`: frame records are written off the lock).

Incremental (`DurabilitySpec.snapshot_max_deltas` > 0, an engine whose `export_delta` parts
carry a generation, a store with delta slots): the export of step 1 is `export_delta(stream,
since)`, since = the generation of the last part written here. A *base* (since 0: everything) is
written as above, then every delta slot is emptied (the old chain), then the log is compacted.
A *delta* (only the pool slabs changed since the part before, `engine/snapshot_delta.py`) goes
to delta slot k (k-th since the base), read back, and the log is *not* compacted: it keeps every
record since the base, so a delta that is lost or damaged costs a longer replay, never data. A
base is written again once `snapshot_max_deltas` deltas follow the base, or once the deltas add
up to more than `snapshot_rebase_ratio` x the base's bytes: at most that many delta slots exist,
and a rebuild reads at most base + that many deltas and replays at most one cadence. The chain
is this shard's: a stream rebuilt or moved here starts with a base (slab ids and generations are
an engine's own).

Invariants:
- The log is compacted only after its snapshot is durable and read back whole (the length and
  crc32 of what the store gives back are those of what was written). A crash between
  any two steps leaves either a whole log (snapshot ignored or unused) or snapshot + tail.
- The snapshot is taken while the stream is admitted (`StreamSlot.admit`): a migration's freeze
  waits for it to finish, so a shard never compacts a log another shard writes. Deleting the
  stream waits for it too (`settle`).
- A log whose first record is an `OpenRecord` is whole. A compacted log starts with the mark of a
  *base* that was durable when it was compacted; deltas never compact it, so the records after
  the base, and after every delta, are in the log.
- A new base replaces the old one atomically before the old deltas are dropped: until they are,
  they name a base that is gone, and `plan_rebuild` takes none of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mosaic_ray.runtime.durability.frame_log import FrameLog, MarkRecord, SnapshotCorruptError
from mosaic_ray.runtime.durability.snapshot_codec import decode_snapshot, encode_chunks, encode_snapshot
from mosaic_ray.runtime.durability.snapshot_file import CrcTally, crc32_of
from mosaic_ray.runtime.durability.snapshot_plan import plan_rebuild, without_snapshot
from mosaic_ray.runtime.actors.stream_slot import StreamSlot

log = logging.getLogger("mosaic_ray.runtime.actors.snapshots")

__all__ = ["StreamSnapshots", "decode_snapshot", "encode_chunks", "encode_snapshot", "plan_rebuild",
           "without_snapshot"]


@dataclass(slots=True)
class _Chain:
    """This shard's snapshot chain of one stream: its base and the deltas written after it."""

    slot: StreamSlot  # the stream as served here: a new slot (moved back, rebuilt) starts a new chain
    base_mark: int
    base_bytes: int
    generation: int  # the engine's generation of the last part written: the next delta's `since`
    deltas: int = 0
    delta_bytes: int = 0


class StreamSnapshots:
    """A shard's snapshot cadence. `note` after each acknowledged batch; `take` runs as a task,
    at most one per stream at a time; `settle` waits for a stream's before it is deleted.

    The cadence is approximate: frames are counted when their acknowledgement returns, after the
    stream's lock is released, so a batch applied just before a mark may count toward the next
    snapshot (at most one coalesced group early), and frames acknowledged while a snapshot is in
    flight wait for the next acknowledgement to start one."""

    def __init__(
        self, store: FrameLog, every_frames: int, call: Callable[..., Awaitable[Any]],
        export: Callable[..., dict[str, Any]], owns: Callable[[str, StreamSlot], bool], hold_timeout_s: float,
        size: Callable[[str], int] | None = None, max_bytes: int = 0, max_deltas: int = 0,
        rebase_ratio: float = 1.0,
    ) -> None:
        """`export(stream_id, since)`: the engine's `export_delta` (with max_deltas 0 it is called
        with since 0 only, and a part without a generation is always written whole)."""
        if every_frames < 1:
            raise ValueError(f"every_frames must be >= 1, got {every_frames}")
        self._store, self.every_frames, self._call, self._export = store, every_frames, call, export
        self._owns, self._hold_timeout_s = owns, hold_timeout_s
        self._size, self.max_bytes = size, max_bytes  # streams over max_bytes get no base
        self.max_deltas, self.rebase_ratio = max_deltas, rebase_ratio
        self.skipped = 0
        self._due: dict[str, int] = {}  # frames acknowledged since the stream's last mark
        self._tasks: dict[str, asyncio.Task] = {}
        self._chains: dict[str, _Chain] = {}
        self._last_mark = 0
        self.taken = 0
        self.deltas_taken = 0
        self.failed = 0
        self.bytes_written = 0
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
        """A rebuilt stream: the frames replayed after its snapshot count toward the next (a base:
        its chain was another engine's)."""
        self._due[stream_id] = frames_replayed
        self._chains.pop(stream_id, None)

    async def settle(self, stream_id: str) -> None:
        task = self._tasks.get(stream_id)
        if task is not None:
            await asyncio.wait([task])
        self._due.pop(stream_id, None)
        self.last.pop(stream_id, None)
        self._chains.pop(stream_id, None)

    def _delta_of(self, sid: str, slot: StreamSlot) -> _Chain | None:
        """The chain the next snapshot extends with a delta; None when it must be a base."""
        chain = self._chains.get(sid)
        if chain is None or chain.slot is not slot or not self.max_deltas:
            return None
        if chain.deltas >= self.max_deltas or chain.delta_bytes > self.rebase_ratio * chain.base_bytes:
            return None
        return chain

    async def take(self, slot: StreamSlot) -> dict[str, Any] | None:
        """Snapshot the stream (a base, or a delta after this shard's last part of it) and, for a
        base, compact its log; None when it was not (moved, deleted, failed: the log and the
        parts already written stay as they were, up to the next try)."""
        sid = slot.stream_id
        try:
            async with slot.admit(self._hold_timeout_s):
                start = time.perf_counter()
                async with slot.lock:
                    if not self._owns(sid, slot):
                        return None
                    chain = self._delta_of(sid, slot)
                    if chain is None and self.max_bytes and self._size is not None:
                        nbytes = await self._call(self._size, sid)
                        if nbytes > self.max_bytes:
                            chain = self._chains.get(sid) if self.max_deltas else None
                            if chain is None or chain.slot is not slot:
                                self.skipped += 1
                                self._due[sid] = 0
                                log.warning("stream %s: %d KV bytes > snapshot_max_bytes %d: no snapshot, its "
                                            "log stays whole", sid, nbytes, self.max_bytes)
                                return None
                            # too large for a base: its chain goes on (one more delta slot)
                    state = await self._call(self._export, sid, chain.generation if chain is not None else 0)
                    generation = state["meta"].get("generation") if self.max_deltas else None
                    if generation is None:
                        chain = None  # a whole part: written as a base
                    mark = self._last_mark = max(time.time_ns(), self._last_mark + 1)
                    entry = slot.log_order.reserve()  # the mark's place: after what the export holds
                    slot.log_order.fill_mark(entry, lambda seq: MarkRecord(mark, seq))
                    self._due[sid] = 0
                await slot.log_order.durable(entry, self._writer(sid))  # off the lock: see LogOrder
                last_seq = entry.records[0].last_seq
                base, index = (chain.base_mark, chain.deltas + 1) if chain is not None else (None, 0)
                chunks = encode_chunks(state, mark, last_seq, base, index)
                state = None  # the chunks hold the export's tensors until they are written
                nbytes = await asyncio.to_thread(self._write_verified, sid, mark, chunks, index)
                if chain is not None:
                    chain.deltas, chain.generation, chain.delta_bytes = index, generation, chain.delta_bytes + nbytes
                    dropped = 0
                else:
                    self._chains.pop(sid, None)
                    if type(self._store).drop_deltas is not FrameLog.drop_deltas:
                        await asyncio.to_thread(self._store.drop_deltas, sid)  # the old chain's
                    async with slot.lock:
                        if not self._owns(sid, slot):
                            return None
                        dropped = await slot.log_order.exclusive(
                            lambda: asyncio.to_thread(self._store.truncate_before, sid, mark))
                    if generation is not None:
                        self._chains[sid] = _Chain(slot, mark, nbytes, generation)
        except Exception as exc:  # EngineError (moved, busy, refused), OSError, serialization
            self.failed += 1
            log.warning("stream %s: snapshot not taken (%s: %s); its log stays whole", sid, type(exc).__name__, exc)
            return None
        self.taken += 1
        self.deltas_taken += chain is not None
        self.bytes_written += nbytes
        info = {"mark": mark, "last_seq": last_seq, "bytes": nbytes, "records_dropped": dropped,
                "kind": "delta" if chain is not None else "base", "index": chain.deltas if chain is not None else 0,
                "seconds": time.perf_counter() - start}
        self.last[sid] = info
        return info

    def _writer(self, stream_id: str):
        store = self._store
        return lambda records: asyncio.to_thread(store.append, stream_id, records)

    def _write_verified(self, stream_id: str, mark: int, chunks, index: int = 0) -> int:
        return write_verified(self._store, stream_id, mark, chunks, index)


def write_verified(store: FrameLog, stream_id: str, mark: int, chunks, index: int = 0) -> int:
    """Write a part's chunks (`encode_chunks`) to its slot (`index` 0: the base's), read it back
    and check its length and crc32 against those counted while writing; returns its length."""
    tally = CrcTally(chunks)
    if index:
        store.put_delta(stream_id, index, mark, tally)
        back = store.get_delta(stream_id, index)
    else:
        store.put_snapshot(stream_id, mark, tally)
        back = store.get_snapshot(stream_id)
    if back is None or back[0] != mark or memoryview(back[1]).nbytes != tally.length \
            or crc32_of(back[1]) != tally.crc:
        raise SnapshotCorruptError(f"snapshot of {stream_id!r} did not read back as written")
    return tally.length
