"""ShardLog: a shard's side of the frame logs (`frame_log.py`), as async calls.

The store is synchronous (file writes, fsync); the shard's event loop must not wait on a disk, so
every store call runs on a worker thread. A stream's records are kept in order by its
`LogOrder` (`log_order.py`: one writer at a time, in the engine's order); the store itself orders
nothing across threads.

What the shard logs, and when (each before the acknowledgement; `ingest.py`, `shard.py`):

    open_stream     an `OpenRecord` (a stale log of a former stream of that id is removed first)
    append_frames   one `FrameRecord` per batch, seq set, frames still encoded; once the engine
                    took them (`LogOrder`: in the engine's order; a refused batch leaves nothing)
    append_text     a `TextRecord`, once the engine took it (the same way)
    configure       an `OptionsRecord` (per-stream engine options), once the engine took it
    close_stream    the log is deleted
    migration       the source releases its handle; the target appends to the same log
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mosaic_ray.runtime.config import DurabilitySpec
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame, decode_all
from mosaic_ray.runtime.durability.frame_log import (
    FrameLog,
    FrameRecord,
    LogRecord,
    OpenRecord,
    OptionsRecord,
    TextRecord,
)
from mosaic_ray.runtime.durability.frame_log_stores import open_frame_log


class ShardLog:
    def __init__(self, spec: DurabilitySpec, runtime_name: str, decode_threads: int) -> None:
        self.spec = spec
        self.store: FrameLog = open_frame_log(spec, runtime_name)
        self._decode_threads = decode_threads
        self._decoders: ThreadPoolExecutor | None = None  # for replays only, made on first use

    async def opened(self, stream_id: str) -> None:
        def write() -> None:
            self.store.delete(stream_id)
            self.store.append(stream_id, [OpenRecord(time.time())])

        await asyncio.to_thread(write)

    async def write(self, stream_id: str, records: list[LogRecord]) -> None:
        """`records` appended to the stream's log, in order (a `LogOrder` decides what and when)."""
        await asyncio.to_thread(self.store.append, stream_id, records)

    async def read(self, stream_id: str) -> list[LogRecord]:
        return await asyncio.to_thread(lambda: list(self.store.read(stream_id)))

    async def exists(self, stream_id: str) -> bool:
        return await asyncio.to_thread(self.store.exists, stream_id)

    async def release(self, stream_id: str) -> None:
        await asyncio.to_thread(self.store.release, stream_id)

    async def delete(self, stream_id: str) -> None:
        await asyncio.to_thread(self.store.delete, stream_id)

    async def sync(self) -> None:
        await asyncio.to_thread(self.store.sync)

    async def decode(self, frames: list[EncodedFrame]) -> list[np.ndarray]:
        """Pixels of logged frames, on this log's own threads (replays run beside live ingest)."""
        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="replay-decode")
        return await asyncio.get_running_loop().run_in_executor(None, decode_all, frames, self._decoders)


def frame_record(seq: int, frames: list, timestamps: list[float]) -> FrameRecord:
    """The record of an accepted batch: its frames as they arrived (pixels are logged raw)."""
    return FrameRecord(seq, tuple(_encoded(f) for f in frames), tuple(float(t) for t in timestamps))


def text_record(text: str, timestamp: float) -> TextRecord:
    return TextRecord(text, float(timestamp))


def options_record(options: dict) -> OptionsRecord:
    return OptionsRecord(dict(options))


def _encoded(frame: EncodedFrame | np.ndarray) -> EncodedFrame:
    """Frames given as pixels (Ray callers, tests) are logged raw."""
    if isinstance(frame, EncodedFrame):
        return frame
    arr = np.ascontiguousarray(frame)
    return EncodedFrame("raw", arr.tobytes(), tuple(int(d) for d in arr.shape))
