"""One server per frame-log directory: a second holder is refused with a message naming the first;
the lock goes with its process, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mosaic_ray.runtime.durability.log_dir_lock import LOCK_NAME, LogDirInUseError, LogDirLock

HOLD = ("import sys, time; from mosaic_ray.runtime.durability.log_dir_lock import LogDirLock; "
        "LogDirLock.acquire(sys.argv[1], 'http://127.0.0.1:8000'); print('held', flush=True); time.sleep(60)")


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = LogDirLock.acquire(tmp_path / "logs", owner="http://127.0.0.1:8000")
    assert json.loads((tmp_path / "logs" / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(LogDirInUseError, match=rf"{tmp_path / 'logs'} is in use .*pid {os.getpid()}, "
                       r"http://127.0.0.1:8000.*--log-dir DIR"):
        LogDirLock.acquire(tmp_path / "logs", owner="http://127.0.0.1:8001")
    first.release()
    with LogDirLock.acquire(tmp_path / "logs", owner="http://127.0.0.1:8001"):
        assert json.loads((tmp_path / "logs" / LOCK_NAME).read_text())["owner"] == "http://127.0.0.1:8001"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LogDirInUseError, match=f"pid {holder.pid}"):
            LogDirLock.acquire(tmp_path, owner="second")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    LogDirLock.acquire(tmp_path, owner="second").release()  # the file stays; the lock went with the process
