"""LogOrder: a stream's log records, written in the order their operations reached the engine,
and only for the operations the engine accepted.

Why: a record written before the engine sees its operation (a write-ahead log) is in the log even
when the engine then refuses it; the seq of a refused batch was then reused by the next batch,
and replay skipped that acknowledged batch as a duplicate (issue 20, item 1). So the log is
written after the engine took the operation, and each operation keeps its place in line:

    reserve()          under the stream's lock, when the operation is handed to the engine:
                       its place in the log is fixed now (the engine's order)
    fill(entry, recs)  the engine took it: these records are what the log keeps of it
    drop(entry)        the engine refused it: it leaves nothing in the log
    durable(entry)     returns once the entry's records, and every entry's before them, are in
                       the log; raises the store's error when the write fails

Invariants:
- The log holds the filled entries' records in reservation order; a dropped entry holds none.
- A write that fails keeps its records first in line: nothing reserved after them is written
  before them, and the next `durable` (of any entry) writes them first. So the engine may hold
  an operation the log does not have yet, never the reverse; such an operation is not
  acknowledged (its caller got the store's error), and a retry of its seq waits for it.
- `durable` never needs the stream's lock (an entry is filled by its operation's own task, off
  the lock): a caller must not hold the lock while it waits, or an entry ahead of it that needs
  the lock to be retried could never be filled.
- One writer at a time (`_writing`): `exclusive` runs a store operation that must not overlap a
  write of this stream (a snapshot's compaction).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from mosaic_ray.runtime.durability.frame_log import FrameRecord, LogRecord, MarkRecord

# records -> they are in the stream's log (raises, e.g. `LogWriteError`, when they are not)
WriteFn = Callable[[list[LogRecord]], Awaitable[Any]]
# the seq of the last frame batch written before it -> the records of a snapshot's mark
MarkFn = Callable[[int], MarkRecord]


class LogEntry:
    __slots__ = ("records", "mark", "filled", "written")

    def __init__(self) -> None:
        self.records: list[LogRecord] = []
        self.mark: MarkFn | None = None
        self.filled = asyncio.Event()  # set by fill or drop
        self.written = False

    @property
    def seqs(self) -> list[int]:
        return [r.seq for r in self.records if isinstance(r, FrameRecord)]


class LogOrder:
    def __init__(self, logged_seq: int = -1) -> None:
        self._entries: deque[LogEntry] = deque()
        self._writing = asyncio.Lock()
        # The seq of the last frame record written (a mark records it: the stream's seq there).
        self.logged_seq = logged_seq

    def reserve(self) -> LogEntry:
        entry = LogEntry()
        self._entries.append(entry)
        return entry

    def fill(self, entry: LogEntry, records: list[LogRecord]) -> None:
        entry.records = list(records)
        entry.filled.set()

    def fill_mark(self, entry: LogEntry, mark: MarkFn) -> None:
        """A snapshot's mark, whose `last_seq` is known only once the entries before it are in."""
        entry.mark = mark
        entry.filled.set()

    def drop(self, entry: LogEntry) -> None:
        entry.records = []
        entry.filled.set()

    def unwritten(self, seq: int) -> LogEntry | None:
        """The entry holding frame batch `seq` while it is not in the log yet (None if none)."""
        return next((e for e in self._entries if seq in e.seqs), None)

    @property
    def pending(self) -> int:
        """Entries reserved and not written yet."""
        return len(self._entries)

    async def durable(self, entry: LogEntry, write: WriteFn) -> None:
        while not entry.written:
            head = self._entries[0]
            if not head.filled.is_set():
                await head.filled.wait()
                continue
            async with self._writing:
                if not entry.written:
                    await self._write_filled(write)

    async def flush(self, write: WriteFn) -> None:
        """Every entry reserved so far is in the log (or dropped) when this returns."""
        if self._entries:
            await self.durable(self._entries[-1], write)

    async def exclusive(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        async with self._writing:
            return await fn()

    async def _write_filled(self, write: WriteFn) -> None:
        """Write the filled prefix of the line in one store call; on failure nothing moves."""
        batch, records, seq = [], [], self.logged_seq
        for e in self._entries:
            if not e.filled.is_set():
                break
            if e.mark is not None:
                e.records = [e.mark(seq)]
                e.mark = None
            seq = max([seq, *e.seqs])
            batch.append(e)
            records.extend(e.records)
        if records:
            await write(records)
        for e in batch:
            self._entries.popleft()
            e.written = True
        self.logged_seq = seq
