"""FrameLog: every acknowledged frame batch and text event of a stream, in a per-stream log.

A shard acknowledges a frame batch (or a text append) only after its record is in the stream's
log, so a stream whose shard died can be rebuilt elsewhere by replaying the log through an engine
(`log_replay.py`). The log holds what the client sent, still encoded (JPEG/PNG bytes as they
arrived, `EncodedFrame`), so it costs what the upload cost, not 10-20x that in pixels.

The store is pluggable; its primitives:

    append(stream_id, records) -> durable   records in order; `durable` says they were fsynced
    read(stream_id, from_seq)               the records, in append order (an iterator)
    exists / list_streams                   the streams that have a log
    release(stream_id)                      this process stops writing the stream (it moved away)
    delete(stream_id)                       the stream was deleted: its log and snapshot go too
    sync / close                            flush everything (shutdown)
    put_snapshot(stream_id, mark, blob)     the stream's one snapshot slot, replaced atomically;
                                            blob: bytes, or an iterable of bytes-like chunks
    get_snapshot(stream_id)                 -> (mark, blob: bytes-like) | None
    truncate_before(stream_id, mark)        compaction: drop the records before `MarkRecord(mark)`
    put_delta / get_delta(stream_id, k)     incremental snapshots: delta slot k = 1, 2, ... after
    drop_deltas(stream_id)                  the base slot (`put_snapshot`); dropping removes all

Invariants every store keeps:
- `read` yields exactly the records `append` was given, in order, for every `append` that
  returned; a record is never half there (a torn tail, left by a crash mid-write, is dropped).
- Records of one stream are appended by one writer at a time (the shard that owns the stream,
  through the stream's `LogOrder`, which also keeps compaction apart from appends): stores need
  no cross-writer ordering.
- Every log starts with an `OpenRecord`, so a stream with no frames yet is still found, until it
  is compacted: then it starts with the `MarkRecord` of the snapshot that holds everything before
  it (`snapshots.py`). So a log whose first record is an `OpenRecord` is whole: replaying it alone
  rebuilds the stream; any other log needs its snapshot.
- A snapshot (base or delta slot) replaces the previous one whole or not at all (a torn write
  leaves the old one).

Stores: `DiskFrameLog` (`frame_log_disk.py`, the default; a root directory that may be shared
storage) and `MemoryFrameLog` (tests; one process). A deployment names its own with
`DurabilitySpec.store = "package.module:attr"`; `frame_log_stores.open_frame_log` opens the one a
spec names.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgpack

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.errors import RetryLaterError
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame

class LogCorruptError(EngineError):
    """A record in the middle of a log fails its checksum: the log cannot be trusted past it."""

    code = "log_corrupt"
    status = 500


class LogWriteError(RetryLaterError):
    """The log refused a write (disk full, storage gone): nothing was acknowledged; retry later."""

    code = "log_unavailable"
    status = 503


@dataclass(slots=True, frozen=True)
class OpenRecord:
    """The first record of every log: the stream was opened."""

    created: float


@dataclass(slots=True, frozen=True)
class FrameRecord:
    """One acknowledged frame batch: its seq, its frames as they arrived, their timestamps."""

    seq: int
    frames: tuple[EncodedFrame, ...]
    timestamps: tuple[float, ...]


@dataclass(slots=True, frozen=True)
class TextRecord:
    text: str
    timestamp: float


@dataclass(slots=True, frozen=True)
class OptionsRecord:
    """Per-stream engine options set (`Engine.configure_stream`: pruning, ...)."""

    options: dict


@dataclass(slots=True, frozen=True)
class MarkRecord:
    """Where a snapshot was taken: the engine then held exactly the records before this one.
    `mark` names the snapshot (unique per stream); `last_seq` is the stream's seq at that point."""

    mark: int
    last_seq: int


LogRecord = OpenRecord | FrameRecord | TextRecord | OptionsRecord | MarkRecord


class SnapshotCorruptError(LogCorruptError):
    """A stored snapshot fails its checksum (or cannot be decoded)."""


def encode_record(record: LogRecord) -> bytes:
    """A record as msgpack: ["o", created] | ["f", seq, [[kind, data, shape]], [ts]] | ["t", text, ts]
    | ["c", options] | ["m", mark, last_seq]."""
    if isinstance(record, FrameRecord):
        frames = [[f.kind, f.data, list(f.shape)] for f in record.frames]
        body = ["f", record.seq, frames, list(record.timestamps)]
    elif isinstance(record, TextRecord):
        body = ["t", record.text, record.timestamp]
    elif isinstance(record, OpenRecord):
        body = ["o", record.created]
    elif isinstance(record, OptionsRecord):
        body = ["c", record.options]
    elif isinstance(record, MarkRecord):
        body = ["m", record.mark, record.last_seq]
    else:
        raise TypeError(f"not a log record: {type(record).__name__}")
    return msgpack.packb(body, use_bin_type=True)


def decode_record(payload: bytes) -> LogRecord:
    body = msgpack.unpackb(payload, raw=False)
    kind = body[0]
    if kind == "f":
        frames = tuple(EncodedFrame(k, bytes(d), tuple(s)) for k, d, s in body[2])
        return FrameRecord(int(body[1]), frames, tuple(float(t) for t in body[3]))
    if kind == "t":
        return TextRecord(body[1], float(body[2]))
    if kind == "o":
        return OpenRecord(float(body[1]))
    if kind == "c":
        return OptionsRecord(dict(body[1]))
    if kind == "m":
        return MarkRecord(int(body[1]), int(body[2]))
    raise LogCorruptError(f"unknown record kind {kind!r}")


def after_seq(records: Iterator[LogRecord], from_seq: int) -> Iterator[LogRecord]:
    """Records from the first frame batch whose seq >= `from_seq` on (text and open records before
    it are skipped with the frames they followed)."""
    started = from_seq <= 0
    for rec in records:
        if not started and isinstance(rec, FrameRecord) and rec.seq >= from_seq:
            started = True
        if started:
            yield rec


# A snapshot part as a store is given it: whole, or as chunks (`snapshot_codec.encode_chunks`).
SnapshotBlob = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview]


def blob_chunks(blob: SnapshotBlob) -> Iterator[bytes | bytearray | memoryview]:
    """The chunks of a `SnapshotBlob`, in order (a bytes-like blob is one chunk)."""
    return iter((blob,)) if isinstance(blob, (bytes, bytearray, memoryview)) else iter(blob)


class FrameLog(abc.ABC):
    """A store of per-stream logs. Thread-safe: shards call it from worker threads."""

    @abc.abstractmethod
    def append(self, stream_id: str, records: Sequence[LogRecord]) -> bool:
        """Append `records` in order; True when they are fsynced, False when only written.
        Raises `LogWriteError` when nothing can be promised (then none of them counts)."""

    @abc.abstractmethod
    def read(self, stream_id: str, from_seq: int = 0) -> Iterator[LogRecord]:
        """The stream's records in order (none if it has no log); a torn tail is dropped,
        a corrupt record before the tail raises `LogCorruptError`."""

    @abc.abstractmethod
    def exists(self, stream_id: str) -> bool: ...

    @abc.abstractmethod
    def list_streams(self) -> list[str]: ...

    @abc.abstractmethod
    def release(self, stream_id: str) -> None:
        """Flush and forget the stream's open handle (another shard writes it from now on)."""

    @abc.abstractmethod
    def delete(self, stream_id: str) -> None: ...

    def sync(self) -> None:
        """Make every write so far durable (fsync), whatever the policy."""

    def close(self) -> None:
        self.sync()

    # Snapshots and compaction (`snapshots.py`). A store without them keeps whole logs: the
    # shard then takes no snapshots (these raise NotImplementedError).
    def put_snapshot(self, stream_id: str, mark: int, blob: SnapshotBlob) -> None:
        """Replace the stream's snapshot with `blob`, taken at `MarkRecord(mark)`; durable when it
        returns. `blob` is bytes or an iterable of bytes-like chunks (`blob_chunks`), consumed once,
        in order (each chunk stays valid while referenced: it holds what it views). A write cut
        short, or an iterable that raises, leaves the previous snapshot as it was."""
        raise NotImplementedError(f"{type(self).__name__} keeps no snapshots")

    def get_snapshot(self, stream_id: str) -> tuple[int, bytes | memoryview] | None:
        """(mark, blob) of the stream's snapshot, None if it has none; `SnapshotCorruptError` if it
        fails its checksum. The blob is bytes-like: bytes, or a read-only memoryview (the disk
        store's maps the file: its pages are the page cache's, not a copy)."""
        return None

    def truncate_before(self, stream_id: str, mark: int) -> int:
        """Drop every record before `MarkRecord(mark)` (it becomes the first); the records after
        it, appended meanwhile too, stay. Returns the records dropped (0: mark not in the log).
        Called by the stream's writer only, under its stream lock."""
        raise NotImplementedError(f"{type(self).__name__} does not compact")


    # Incremental snapshots (`snapshots.py`): slots 1, 2, ... of deltas after the base. A store
    # without them gets whole snapshots only.
    def put_delta(self, stream_id: str, index: int, mark: int, blob: SnapshotBlob) -> None:
        """Replace delta slot `index` (>= 1) with `blob` (as `put_snapshot`'s), taken at
        `MarkRecord(mark)`; durable when it returns. A write cut short leaves the slot as it was."""
        raise NotImplementedError(f"{type(self).__name__} keeps no snapshot deltas")

    def get_delta(self, stream_id: str, index: int) -> tuple[int, bytes | memoryview] | None:
        """(mark, blob) of delta slot `index`, None if empty; `SnapshotCorruptError` if damaged."""
        return None

    def drop_deltas(self, stream_id: str) -> int:
        """Empty every delta slot of the stream (the last first); returns how many were removed."""
        return 0


def find_mark(payloads: Sequence[bytes], mark: int) -> int | None:
    """The index of `MarkRecord(mark)` among encoded records, None if absent. Searched from the
    end (a mark is recent); only records starting like the mark's encoding are decoded."""
    key = encode_record(MarkRecord(mark, 0))[:-1]  # msgpack of ["m", mark, ...] up to last_seq
    for i in range(len(payloads) - 1, -1, -1):
        p = payloads[i]
        if p[: len(key)] == key and isinstance(rec := decode_record(p), MarkRecord) and rec.mark == mark:
            return i
    return None


class MemoryFrameLog(FrameLog):
    """Logs in this process's memory: for tests of the store contract and single-process runs."""

    def __init__(self) -> None:
        self._logs: dict[str, list[bytes]] = {}
        self._snapshots: dict[str, tuple[int, bytes]] = {}
        self._deltas: dict[str, dict[int, tuple[int, bytes]]] = {}
        self._lock = threading.Lock()

    def append(self, stream_id: str, records: Sequence[LogRecord]) -> bool:
        encoded = [encode_record(r) for r in records]
        with self._lock:
            self._logs.setdefault(stream_id, []).extend(encoded)
        return True

    def read(self, stream_id: str, from_seq: int = 0) -> Iterator[LogRecord]:
        with self._lock:
            payloads = list(self._logs.get(stream_id, ()))
        return after_seq((decode_record(p) for p in payloads), from_seq)

    def exists(self, stream_id: str) -> bool:
        return stream_id in self._logs

    def list_streams(self) -> list[str]:
        with self._lock:
            return sorted(self._logs)

    def release(self, stream_id: str) -> None:
        pass

    def delete(self, stream_id: str) -> None:
        with self._lock:
            self._logs.pop(stream_id, None)
            self._snapshots.pop(stream_id, None)
            self._deltas.pop(stream_id, None)

    def put_snapshot(self, stream_id: str, mark: int, blob: SnapshotBlob) -> None:
        data = b"".join(blob_chunks(blob))  # before the lock: an iterable that raises stores nothing
        with self._lock:
            self._snapshots[stream_id] = (int(mark), data)

    def get_snapshot(self, stream_id: str) -> tuple[int, bytes] | None:
        with self._lock:
            return self._snapshots.get(stream_id)

    def put_delta(self, stream_id: str, index: int, mark: int, blob: SnapshotBlob) -> None:
        if index < 1:
            raise ValueError(f"delta index must be >= 1, got {index}")
        data = b"".join(blob_chunks(blob))
        with self._lock:
            self._deltas.setdefault(stream_id, {})[index] = (int(mark), data)

    def get_delta(self, stream_id: str, index: int) -> tuple[int, bytes] | None:
        with self._lock:
            return self._deltas.get(stream_id, {}).get(index)

    def drop_deltas(self, stream_id: str) -> int:
        with self._lock:
            return len(self._deltas.pop(stream_id, {}))

    def truncate_before(self, stream_id: str, mark: int) -> int:
        with self._lock:
            payloads = self._logs.get(stream_id, [])
            at = find_mark(payloads, mark)
            if not at:
                return 0
            del payloads[:at]
            return at
