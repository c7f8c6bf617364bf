"""LogDirLock: one server per frame-log directory.

A frame-log directory holds one runtime's streams (`frame_log_stores.log_root`); a second server writing
the same directory would replay the first one's streams as its own and append to their logs
behind its back. So `mosaic-ray serve` takes this lock on the directory before Ray starts, and
holds it until it exits; a second server on the same directory refuses to start, naming the one
that holds it.

Invariants:
- The lock is an exclusive `flock` on `<directory>/server.lock`, held by an open descriptor of the
  serving process: it goes with that process however it ends (SIGKILL, a crash), so a stale lock
  file never blocks a restart. Its content (pid, URL, start time) is only what the refusal says.
- `server.lock` does not end in `.log`: frame-log stores never take it for a stream.
- Two processes on one host (or on storage whose `flock` is shared, as NFSv4's is) are kept apart;
  shard actors of the server that holds the lock write freely (they never take it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

LOCK_NAME = "server.lock"


class LogDirInUseError(RuntimeError):
    """Another live server holds the directory's lock."""


class LogDirLock:
    """Held from `acquire` to `release` (or the process's end)."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | Path, owner: str) -> LogDirLock:
        """Lock `directory` (created if missing) for this process; `owner` says who holds it (a URL).
        Raises LogDirInUseError, naming the holder, when another process has it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LogDirInUseError(
                f"frame-log directory {directory} is in use by another mosaic-ray server ({holder}); "
                "give this one its own directory (--log-dir DIR, or app.runtime.durability.root in the config), "
                "or stop the other one"
            ) from None
        # Ours now: say who we are (truncate first: a longer old record must not trail ours).
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "owner": owner, "since": time.time()}).encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LogDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']}, {info['owner']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
