"""DiskFrameLog: one append-only file per stream, `<root>/<stream_id>.log`.

A file is a sequence of records, each

    magic b"MRL1" | payload length u32 | crc32(payload) u32 | crc32(the 12 bytes before) u32 | payload

(little endian; the payload is `frame_log.encode_record`). One append is one `write` of all its
records. Reading checks both checksums:

- a record cut off by the end of the file, or a bad record after which no good record follows,
  is a torn tail (a crash in the middle of a write): dropped, and cut off before the next append;
- a bad record followed by a good one is corruption: `LogCorruptError`, never silently skipped.

The header has its own checksum so that a corrupt length is caught as corruption instead of being
taken for a record running past the end of the file.

fsync policy (`DurabilitySpec.fsync`), and what an acknowledged frame survives:

- "always":   fdatasync before `append` returns. Survives a process crash, an OS crash, a power
              loss. Costs one disk flush per append group.
- "interval": a background thread fdatasyncs the files written in the last `interval_ms`. Survives
              a process crash (the data is in the page cache); an OS crash or power loss loses at
              most the last `interval_ms` of acknowledgements.
- "never":    the OS writes back when it likes (Linux: ~30 s). Survives a process crash only.

A killed shard actor is a process crash: every policy keeps its acknowledged frames. On shared
storage (NFS) written pages reach the server only when flushed: use "always" there, or another
node may not see the last records of a process that died with its node.

Snapshots: a base `<root>/<stream_id>.snap` and its deltas `<stream_id>.snap.<k>`, each one
slot replaced atomically and streamed to disk chunk by chunk, read back through a read-only
mapping (`snapshot_file.py`). Compaction (`truncate_before`) writes
the records from the mark on to `<stream_id>.log.tmp` the same way, under the file's lock and
the store's (no append can slip into the old file), and renames it over the log; records
appended after the mark are copied, a torn tail is not.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mosaic_ray.runtime.durability.frame_log import (
    FrameLog,
    LogCorruptError,
    LogRecord,
    LogWriteError,
    SnapshotBlob,
    after_seq,
    decode_record,
    encode_record,
    find_mark,
)
from mosaic_ray.runtime.durability.snapshot_file import SNAP_SUFFIX, delta_paths, read_slot, write_all, write_slot

MAGIC = b"MRL1"
_HEAD = struct.Struct("<4sIII")  # magic, length, payload crc, header crc
SUFFIX = ".log"
TMP_SUFFIX = ".tmp"


def frame_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record."""
    first = struct.pack("<4sII", MAGIC, len(payload), zlib.crc32(payload))
    return first + struct.pack("<I", zlib.crc32(first)) + payload


def scan(buf: bytes | mmap.mmap) -> tuple[list[tuple[int, int]], int]:
    """The (offset, length) of every good payload, and the end of the last good record.
    Raises `LogCorruptError` for a bad record with a good one after it."""
    out: list[tuple[int, int]] = []
    off, size = 0, len(buf)
    while off < size:
        length = _good_record(buf, off, size)
        if length is None:
            if _good_record_after(buf, off + 1, size):
                raise LogCorruptError(f"log record at byte {off} is corrupt and later records are not")
            break  # torn tail
        out.append((off + _HEAD.size, length))
        off += _HEAD.size + length
    return out, off


def _good_record(buf, off: int, size: int) -> int | None:
    """The payload length of a whole, checksummed record at `off`, else None."""
    if off + _HEAD.size > size:
        return None
    magic, length, crc, head_crc = _HEAD.unpack_from(buf, off)
    if magic != MAGIC or zlib.crc32(buf[off : off + 12]) != head_crc:
        return None
    end = off + _HEAD.size + length
    if end > size or zlib.crc32(buf[off + _HEAD.size : end]) != crc:
        return None
    return length


def _good_record_after(buf, start: int, size: int) -> bool:
    pos = start
    while True:
        pos = buf.find(MAGIC, pos, size)
        if pos < 0:
            return False
        if _good_record(buf, pos, size) is not None:
            return True
        pos += 1


class _Payloads:
    """The payloads of a scanned file as a lazy sequence (compaction looks at a few of them)."""

    def __init__(self, buf, spans: list[tuple[int, int]]) -> None:
        self.buf, self.spans = buf, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> bytes:
        o, n = self.spans[i]
        return bytes(self.buf[o : o + n])


class _File:
    """An open log file: its descriptor, and whether it holds writes not yet fsynced."""

    __slots__ = ("fd", "dirty", "lock")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dirty = False
        self.lock = threading.Lock()


class DiskFrameLog(FrameLog):
    """At most `max_open_files` descriptors stay open (least recently written closed first, after
    an fsync under "always"/"interval"); a file this process already checked reopens unscanned."""

    def __init__(
        self, root: str | Path, fsync: str = "interval", interval_ms: int = 100, max_open_files: int = 512,
    ) -> None:
        if fsync not in ("always", "interval", "never"):
            raise ValueError(f"fsync must be 'always', 'interval' or 'never', got {fsync!r}")
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.interval_s = interval_ms / 1e3
        self.max_open_files = max_open_files
        self._files: OrderedDict[str, _File] = OrderedDict()  # least recently written first
        self._checked: set[str] = set()  # files whose tail this process knows is whole
        self._lock = threading.Lock()  # guards `_files` and `_checked`
        self._dir_dirty = False
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if fsync == "interval":
            self._flusher = threading.Thread(target=self._flush_loop, name="frame-log-fsync", daemon=True)
            self._flusher.start()

    def path(self, stream_id: str) -> Path:
        return self.root / f"{stream_id}{SUFFIX}"

    # ------------------------------------------------------------------ writing
    def append(self, stream_id: str, records: Sequence[LogRecord]) -> bool:
        data = b"".join(frame_record(encode_record(r)) for r in records)
        while True:
            f = self._open(stream_id)
            with f.lock:
                if f.fd < 0:
                    continue  # closed meanwhile (evicted, released): open it again
                try:
                    write_all(f.fd, data)
                    if self.fsync == "always":
                        os.fdatasync(f.fd)
                        self._sync_dir_if_dirty()
                    else:
                        f.dirty = True
                except OSError as exc:
                    raise LogWriteError(f"frame log write failed: {exc}") from None
                return self.fsync == "always"

    def _open(self, stream_id: str) -> _File:
        evicted = None
        with self._lock:
            f = self._files.get(stream_id)
            if f is not None:
                self._files.move_to_end(stream_id)
                return f
            path = self.path(stream_id)
            try:
                created = not path.exists()
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
                if not created and stream_id not in self._checked:
                    _, end = self._scan_file(fd)  # cut a torn tail: new records never follow garbage
                    if end < os.fstat(fd).st_size:
                        os.ftruncate(fd, end)
            except OSError as exc:
                raise LogWriteError(f"cannot open frame log {path}: {exc}") from None
            self._dir_dirty |= created
            self._checked.add(stream_id)
            f = self._files[stream_id] = _File(fd)
            if len(self._files) > self.max_open_files:
                evicted = self._files.popitem(last=False)[1]
        if evicted is not None:
            self._close(evicted)
        return f

    def _close(self, f: _File) -> None:
        with f.lock:
            if f.fd < 0:
                return
            if f.dirty and self.fsync != "never":
                os.fdatasync(f.fd)
            os.close(f.fd)
            f.fd = -1

    def release(self, stream_id: str) -> None:
        with self._lock:
            f = self._files.pop(stream_id, None)
            self._checked.discard(stream_id)  # another process writes it from now on
        if f is not None:
            self._close(f)

    def delete(self, stream_id: str) -> None:
        with self._lock:
            f = self._files.pop(stream_id, None)
            self._checked.discard(stream_id)
        if f is not None:
            with f.lock:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
        deltas = [p for _, p in delta_paths(self.root, stream_id)]
        for path in (self.path(stream_id), self.snapshot_path(stream_id), *deltas):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def sync(self) -> None:
        with self._lock:
            files = list(self._files.values())
        for f in files:
            with f.lock:
                if f.fd >= 0 and f.dirty:
                    os.fdatasync(f.fd)
                    f.dirty = False
        self._sync_dir_if_dirty()

    def close(self) -> None:
        self._stop.set()
        self.sync()
        with self._lock:
            files, self._files = list(self._files.values()), {}
        for f in files:
            with f.lock:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1

    def _sync_dir_if_dirty(self) -> None:
        """A new file's name is durable only once its directory is fsynced."""
        if not self._dir_dirty:
            return
        self._dir_dirty = False
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except OSError:
                pass  # the next append reports a failing disk to its caller

    # ------------------------------------------------------------------ reading
    def read(self, stream_id: str, from_seq: int = 0) -> Iterator[LogRecord]:
        try:
            fd = os.open(self.path(stream_id), os.O_RDONLY)
        except FileNotFoundError:
            return iter(())
        try:
            payloads = self._scan_file(fd, with_payloads=True)[0]
        finally:
            os.close(fd)
        return after_seq((decode_record(p) for p in payloads), from_seq)

    @staticmethod
    def _scan_file(fd: int, with_payloads: bool = False) -> tuple[list, int]:
        size = os.fstat(fd).st_size
        if size == 0:
            return [], 0
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
            spans, end = scan(buf)
            payloads = [bytes(buf[o : o + n]) for o, n in spans] if with_payloads else []
        return payloads, end

    # ------------------------------------------------------------------ snapshots, compaction
    def snapshot_path(self, stream_id: str) -> Path:
        return self.root / f"{stream_id}{SNAP_SUFFIX}"

    def put_snapshot(self, stream_id: str, mark: int, blob: SnapshotBlob) -> None:
        self._put_slot(self.snapshot_path(stream_id), mark, blob, "snapshot")

    def _put_slot(self, path: Path, mark: int, blob: SnapshotBlob, what: str) -> None:
        try:
            self._replace(path, lambda fd: write_slot(fd, mark, blob))
        except OSError as exc:
            raise LogWriteError(f"{what} write failed: {exc}") from None

    def get_snapshot(self, stream_id: str) -> tuple[int, memoryview] | None:
        return read_slot(self.snapshot_path(stream_id), f"snapshot of {stream_id!r}")

    def delta_path(self, stream_id: str, index: int) -> Path:
        return self.root / f"{stream_id}{SNAP_SUFFIX}.{index}"

    def put_delta(self, stream_id: str, index: int, mark: int, blob: SnapshotBlob) -> None:
        if index < 1:
            raise ValueError(f"delta index must be >= 1, got {index}")
        self._put_slot(self.delta_path(stream_id, index), mark, blob, "snapshot delta")

    def get_delta(self, stream_id: str, index: int) -> tuple[int, memoryview] | None:
        return read_slot(self.delta_path(stream_id, index), f"snapshot delta {index} of {stream_id!r}")

    def drop_deltas(self, stream_id: str) -> int:
        paths = delta_paths(self.root, stream_id)
        for _, path in reversed(paths):  # the last first: a crash midway leaves a chain's prefix
            path.unlink(missing_ok=True)
        if paths:
            self._dir_dirty = True
            self._sync_dir_if_dirty()
        return len(paths)

    def truncate_before(self, stream_id: str, mark: int) -> int:
        while True:
            f = self._open(stream_id)
            with f.lock:
                if f.fd < 0:
                    continue  # closed meanwhile: open it again
                size = os.fstat(f.fd).st_size
                if size == 0:
                    return 0
                with mmap.mmap(f.fd, size, access=mmap.ACCESS_READ) as buf:
                    spans, end = scan(buf)
                    at = find_mark(_Payloads(buf, spans), mark)
                    if not at:
                        return 0
                    kept = bytes(buf[spans[at][0] - _HEAD.size : end])
                path = self.path(stream_id)
                with self._lock:  # no other descriptor of this stream can open while we swap files
                    if self._files.get(stream_id) is not f:
                        return 0  # evicted and maybe reopened meanwhile: compact next time
                    try:
                        self._replace(path, lambda fd: write_all(fd, kept))
                    except OSError as exc:
                        raise LogWriteError(f"log compaction failed: {exc}") from None
                    del self._files[stream_id]  # the next append opens the new file
                os.close(f.fd)
                f.fd = -1
                return at

    def _replace(self, path: Path, write: Callable[[int], object]) -> None:
        """Replace `path` atomically with what `write(fd)` writes: to a temp file, fsynced, renamed
        over `path`, the directory fsynced. If `write` (or the fsync) raises, the temp file is
        removed and `path` is as it was."""
        tmp = path.with_name(path.name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        self._dir_dirty = True
        self._sync_dir_if_dirty()

    def exists(self, stream_id: str) -> bool:
        return self.path(stream_id).exists()

    def list_streams(self) -> list[str]:
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}"))
