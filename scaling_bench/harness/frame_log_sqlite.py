"""SqliteFrameLog: the frame log in one SQLite database in WAL mode, for measurement only (issue 18).

`frame_log_cost.py --store sqlite` runs the durability benchmarks against it next to `DiskFrameLog`;
docs/reliability.md ("Why not SQLite (measured)") has the result. It is a measurement, not a
production store: it keeps no snapshots and is not wired into `open_frame_log` (though it is a
`FrameLog`, so `DurabilitySpec.store = "scaling_bench.harness.frame_log_sqlite:open_store"` would run it).

Layout: `<root>/frames.db` (plus SQLite's `frames.db-wal` and `frames.db-shm`), one table

    log(stream TEXT, n INTEGER, mark INTEGER NULL, payload BLOB, PRIMARY KEY (stream, n))

`payload` is `frame_log.encode_record(record)`, the same bytes `DiskFrameLog` frames with its
checksummed header, so the comparison is of storage, not of encoding. `mark` is set on
`MarkRecord`s only (compaction finds its mark by index instead of scanning payloads).

One `append` is one transaction. fsync policy -> `PRAGMA synchronous` (with journal_mode=WAL):

- "never"    -> OFF:    SQLite never fsyncs; the OS writes back when it likes.
- "interval" -> NORMAL: commits are not fsynced; the WAL is fsynced before each checkpoint
                        (every `wal_autocheckpoint` = 1000 pages by default, ~4 MB here, run by
                        the committing append; with `checkpoint_ms` > 0 a thread checkpoints
                        every checkpoint_ms instead, as `DiskFrameLog`'s flusher fsyncs).
                        Power loss may roll back the last transactions, never corrupts.
- "always"   -> FULL:   the WAL is fsynced at every commit: durable when `append` returns.

Compaction (`truncate_before`) deletes the rows before the mark in one transaction; freed pages
are reused by later appends (the file keeps its high-water size) unless `reclaim()` is called
(checkpoint, `incremental_vacuum`, checkpoint again, truncate the WAL).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from mosaic_ray.runtime.durability.frame_log import (
    FrameLog,
    LogRecord,
    LogWriteError,
    MarkRecord,
    after_seq,
    decode_record,
    encode_record,
)

SYNCHRONOUS = {"never": "OFF", "interval": "NORMAL", "always": "FULL"}
DB_NAME = "frames.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    stream TEXT NOT NULL,
    n INTEGER NOT NULL,
    mark INTEGER,
    payload BLOB NOT NULL,
    PRIMARY KEY (stream, n)
);
CREATE INDEX IF NOT EXISTS log_mark ON log (stream, mark) WHERE mark IS NOT NULL;
"""


class SqliteFrameLog(FrameLog):
    """One connection, serialized by a lock (SQLite allows one writer per database at a time;
    other processes writing the same file wait on its lock, up to `busy_timeout_ms`)."""

    def __init__(self, root: str | Path, fsync: str = "interval", busy_timeout_ms: int = 10_000,
                 checkpoint_ms: int = 0) -> None:
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be one of {sorted(SYNCHRONOUS)}, got {fsync!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.path = self.root / DB_NAME
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one append = one transaction).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=busy_timeout_ms / 1e3)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new database only
        self._db.execute("PRAGMA secure_delete=OFF")  # Debian builds default it on: deletes rewrite pages
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"SQLite refused WAL mode (got {mode!r}): shared memory unavailable?")
        self._db.execute(f"PRAGMA synchronous={SYNCHRONOUS[fsync]}")
        self._db.executescript(_SCHEMA)
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_ms > 0:  # checkpoints off the append path, every checkpoint_ms (as our flusher)
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_ms / 1e3,),
                                                  name="frame-log-checkpoint", daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self, every_s: float) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA synchronous={SYNCHRONOUS[self.fsync]}")  # a checkpoint fsyncs unless OFF
        try:
            while not self._stop.wait(every_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # the next append reports a failing disk to its caller
        finally:
            db.close()

    # ------------------------------------------------------------------ writing
    def append(self, stream_id: str, records: Sequence[LogRecord]) -> bool:
        rows = []
        for r in records:
            rows.append((r.mark if isinstance(r, MarkRecord) else None, encode_record(r)))
        with self._write("frame log write failed"):
            n = self._db.execute("SELECT coalesce(max(n), -1) + 1 FROM log WHERE stream = ?", (stream_id,)).fetchone()[0]
            self._db.executemany("INSERT INTO log (stream, n, mark, payload) VALUES (?, ?, ?, ?)",
                                 [(stream_id, n + i, mark, payload) for i, (mark, payload) in enumerate(rows)])
        return self.fsync == "always"

    @contextlib.contextmanager
    def _write(self, failure: str):
        """One write transaction under the store's lock: BEGIN IMMEDIATE takes SQLite's write lock
        at once (no other writer in between), COMMIT on success, ROLLBACK on any exception; an
        sqlite3.Error surfaces as LogWriteError(`failure`: ...), as DiskFrameLog's do."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LogWriteError(f"{failure}: {exc}") from None

    def release(self, stream_id: str) -> None:
        pass  # nothing per stream is held open

    def delete(self, stream_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM log WHERE stream = ?", (stream_id,))

    def sync(self) -> None:
        """Make every commit durable: a checkpoint fsyncs the WAL, then the database file."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(FULL)")

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.sync()
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reading
    def read(self, stream_id: str, from_seq: int = 0) -> Iterator[LogRecord]:
        with self._lock:  # one read transaction: a consistent view of the stream
            payloads = [p for (p,) in self._db.execute(
                "SELECT payload FROM log WHERE stream = ? ORDER BY n", (stream_id,))]
        return after_seq((decode_record(p) for p in payloads), from_seq)

    def exists(self, stream_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM log WHERE stream = ? LIMIT 1", (stream_id,)).fetchone() is not None

    def list_streams(self) -> list[str]:
        with self._lock:
            return [s for (s,) in self._db.execute("SELECT DISTINCT stream FROM log ORDER BY stream")]

    # ------------------------------------------------------------------ compaction
    def truncate_before(self, stream_id: str, mark: int) -> int:
        dropped = 0
        with self._write("log compaction failed"):
            row = self._db.execute("SELECT n FROM log WHERE stream = ? AND mark = ? ORDER BY n DESC LIMIT 1",
                                   (stream_id, mark)).fetchone()
            if row is not None:
                dropped = self._db.execute("DELETE FROM log WHERE stream = ? AND n < ?", (stream_id, row[0])).rowcount
        return dropped

    def reclaim(self) -> None:
        """Give freed pages back to the file system (what `DiskFrameLog`'s rewrite does at once)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_bytes(self) -> int:
        """The database's bytes on disk: the main file, its WAL and shared-memory index."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass
        return total


def open_store(spec, runtime_name: str) -> SqliteFrameLog:
    """`DurabilitySpec.store = "scaling_bench.harness.frame_log_sqlite:open_store"`."""
    from mosaic_ray.runtime.durability.frame_log_stores import log_root

    return SqliteFrameLog(log_root(spec, runtime_name), spec.fsync)
