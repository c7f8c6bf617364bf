"""The frame log stores: the contract on both stores, and the disk format's failure cases (torn
tail dropped and cut before the next append, mid-file corruption detected), fsync policies."""

from __future__ import annotations

import os
import time

import pytest

from mosaic_ray.runtime.config import DurabilitySpec
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame
from mosaic_ray.runtime.durability.frame_log import (
    FrameRecord,
    LogCorruptError,
    MemoryFrameLog,
    OpenRecord,
    OptionsRecord,
    TextRecord,
)
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
from mosaic_ray.runtime.durability.frame_log_stores import open_frame_log

JPEG_LIKE = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"


def _batch(seq: int, n: int = 2) -> FrameRecord:
    frames = tuple(EncodedFrame("jpeg", JPEG_LIKE + bytes([seq % 256, i]), (16, 16, 3)) for i in range(n))
    return FrameRecord(seq, frames, tuple(float(seq * n + i) for i in range(n)))


def _history() -> list:
    return [OpenRecord(1.5), _batch(0), TextRecord("a note ✓", 1.0), OptionsRecord({"pruning": True}), _batch(1, 3),
            FrameRecord(2, (EncodedFrame("raw", bytes(range(12)), (2, 2, 3)),), (9.0,))]


def test_contract_round_trip_in_order(store):
    history = _history()
    store.append("s1", history[:2])
    store.append("s1", history[2:])
    store.append("s2", [OpenRecord(2.0)])
    assert list(store.read("s1")) == history
    assert list(store.read("s2")) == [OpenRecord(2.0)]
    assert list(store.read("missing")) == []
    assert store.list_streams() == ["s1", "s2"]
    assert store.exists("s1") and not store.exists("missing")


def test_contract_read_from_seq_and_delete(store):
    store.append("s", _history())
    assert [r.seq for r in store.read("s", from_seq=1) if isinstance(r, FrameRecord)] == [1, 2]
    store.release("s")  # a released stream can be written again (by whoever owns it next)
    store.append("s", [_batch(3)])
    assert list(store.read("s"))[-1] == _batch(3)
    store.delete("s")
    assert not store.exists("s") and list(store.read("s")) == [] and store.list_streams() == []


def test_open_frame_log_names_stores_and_roots(tmp_path):
    disk = open_frame_log(DurabilitySpec(root=str(tmp_path)), "rt")
    assert isinstance(disk, DiskFrameLog) and disk.root == tmp_path / "rt"
    disk.close()
    assert isinstance(open_frame_log(DurabilitySpec(store="memory"), "rt"), MemoryFrameLog)
    with pytest.raises(ValueError):
        DurabilitySpec(store="not a store")
    with pytest.raises(ValueError):
        DurabilitySpec(fsync="sometimes")


def test_torn_tail_is_dropped_and_cut_before_the_next_append(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    log.append("s", _history())
    log.close()
    path = log.path("s")
    whole = path.read_bytes()
    for cut in (1, 7, 15, 40):  # inside the last record's header, then inside its payload
        path.write_bytes(whole[:-cut])
        assert list(DiskFrameLog(tmp_path, "never").read("s")) == _history()[:-1]
    path.write_bytes(whole + b"\x00" * 9)  # zeros after the last record (a crash extended the file)
    assert list(DiskFrameLog(tmp_path, "never").read("s")) == _history()
    path.write_bytes(whole[:-5])
    again = DiskFrameLog(tmp_path, "always")
    again.append("s", [_batch(7)])
    assert list(again.read("s")) == [*_history()[:-1], _batch(7)]
    again.close()


def test_corruption_before_the_tail_is_detected(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    log.append("s", _history())
    log.close()
    path = log.path("s")
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # a byte of the second record's payload: later records are intact
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError):
        list(DiskFrameLog(tmp_path, "never").read("s"))
    data[60] ^= 0xFF
    data[5] ^= 0x01  # the first record's length: its header checksum catches it
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError):
        list(DiskFrameLog(tmp_path, "never").read("s"))


def test_fsync_policies(tmp_path, monkeypatch):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    always = DiskFrameLog(tmp_path / "a", "always")
    assert always.append("s", [_batch(0)]) is True and len(synced) == 1
    never = DiskFrameLog(tmp_path / "n", "never")
    assert never.append("s", [_batch(0)]) is False and len(synced) == 1
    interval = DiskFrameLog(tmp_path / "i", "interval", interval_ms=20)
    assert interval.append("s", [_batch(0)]) is False
    deadline = time.monotonic() + 5
    while len(synced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(synced) == 2  # the background thread flushed it
    never.sync()  # an explicit sync (shutdown) flushes whatever the policy
    assert len(synced) == 3
    for log in (always, never, interval):
        log.close()
        assert list(log.read("s")) == [_batch(0)]


def test_few_open_files_many_streams(tmp_path):
    log = DiskFrameLog(tmp_path, "interval", interval_ms=1000, max_open_files=2)
    streams = [f"s{i}" for i in range(5)]
    for seq in range(3):
        for sid in streams:  # every append past the second stream evicts (fsyncs, closes) one
            log.append(sid, [_batch(seq)])
    assert len(log._files) == 2
    for sid in streams:
        assert list(log.read(sid)) == [_batch(0), _batch(1), _batch(2)]
    log.close()
