"""Snapshots and compaction: the store contract on both stores (atomic snapshot slot, compaction to
a mark), the disk format's failure cases (a torn snapshot write leaves the old one, a corrupt one
is detected, compaction drops a torn tail), and the rebuild plan (snapshot + tail, or full replay,
or `SnapshotLostError` for a compacted log whose snapshot is unusable)."""

from __future__ import annotations

import os

import pytest
import torch

from mosaic_ray.runtime.errors import SnapshotLostError
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame
from mosaic_ray.runtime.durability.frame_log import (
    FrameRecord,
    LogWriteError,
    MarkRecord,
    OpenRecord,
    OptionsRecord,
    SnapshotCorruptError,
    TextRecord,
)
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
from mosaic_ray.runtime.actors.snapshots import decode_snapshot, encode_snapshot, plan_rebuild

MARK = 1_700_000_000_123_456_789  # marks are nanosecond clocks: 8-byte msgpack ints


def _batch(seq: int) -> FrameRecord:
    return FrameRecord(seq, (EncodedFrame("jpeg", b"\xff\xd8" + bytes([seq % 256]) * 500 + b"\xff\xd9", (8, 8, 3)),),
                       (float(seq),))


def _before() -> list:
    return [OpenRecord(1.0), _batch(0), TextRecord("early note", 0.5), OptionsRecord({"pruning": True}), _batch(1)]


def _after() -> list:
    return [_batch(2), TextRecord("late note", 2.5), _batch(3)]


def _state(frames: int) -> dict:
    feats = torch.arange(frames * 4, dtype=torch.float32).reshape(frames, 4)
    tensors = {"features": feats, "keys": feats.to(torch.bfloat16), "t": torch.arange(frames, dtype=torch.float64)}
    return {"meta": {"frames": frames, "texts": [[0.5, "early note"]]}, "tensors": tensors}


def test_contract_snapshot_slot_replaced_and_deleted_with_the_stream(store):
    assert store.get_snapshot("s") is None
    store.append("s", [OpenRecord(0.0)])
    store.put_snapshot("s", 1, b"first")
    store.put_snapshot("s", 2, b"second" * 1000)
    assert store.get_snapshot("s") == (2, b"second" * 1000)
    assert store.get_snapshot("other") is None
    store.delete("s")
    assert store.get_snapshot("s") is None and not store.exists("s")


def test_contract_truncate_before_keeps_the_mark_and_everything_after(store):
    store.append("s", _before() + [MarkRecord(MARK, 1)])
    store.append("s", _after())
    assert store.truncate_before("s", MARK + 1) == 0  # not in the log: nothing dropped
    assert store.truncate_before("s", MARK) == len(_before())
    assert list(store.read("s")) == [MarkRecord(MARK, 1)] + _after()
    store.append("s", [_batch(4)])  # appends go on after a compaction
    assert list(store.read("s")) == [MarkRecord(MARK, 1)] + _after() + [_batch(4)]
    assert store.truncate_before("s", MARK) == 0  # already the first record
    assert store.list_streams() == ["s"]


def test_disk_compaction_shrinks_the_file_and_a_fresh_store_reads_it(tmp_path):
    log = DiskFrameLog(tmp_path, "interval", max_open_files=1)
    log.append("s", _before() + [MarkRecord(MARK, 1)] + _after())
    log.append("t", [OpenRecord(0.0)])  # evicts s's descriptor: compaction reopens it
    size = log.path("s").stat().st_size
    assert log.truncate_before("s", MARK) == len(_before())
    assert log.path("s").stat().st_size < size
    log.append("s", [_batch(4)])
    log.close()
    assert list(DiskFrameLog(tmp_path).read("s")) == [MarkRecord(MARK, 1)] + _after() + [_batch(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.log", "t.log"]  # no temp file left


def test_disk_compaction_drops_a_torn_tail(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    log.append("s", _before() + [MarkRecord(MARK, 1), _batch(2)])
    with open(log.path("s"), "ab") as f:  # a crash in the middle of the next append
        f.write(b"MRL1\x40\x00\x00\x00garbage")
    assert log.truncate_before("s", MARK) == len(_before())
    log.append("s", [_batch(3)])
    assert list(log.read("s")) == [MarkRecord(MARK, 1), _batch(2), _batch(3)]


def test_disk_torn_snapshot_write_leaves_the_old_one(tmp_path, monkeypatch):
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", 1, b"old" * 100)
    # A crash after the temp file was written, before the rename: the temp is ignored.
    (tmp_path / "s.snap.tmp").write_bytes(b"MRS1" + b"\x00" * 10)
    assert log.get_snapshot("s") == (1, b"old" * 100)

    def crash(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(LogWriteError):
        log.put_snapshot("s", 2, b"new")
    monkeypatch.undo()
    assert log.get_snapshot("s") == (1, b"old" * 100)
    log.put_snapshot("s", 3, b"newer")  # the stale temp file is overwritten
    assert log.get_snapshot("s") == (3, b"newer")


@pytest.mark.parametrize("damage", ["flip", "cut", "short"])
def test_disk_corrupt_snapshot_is_detected(tmp_path, damage):
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", 7, bytes(range(256)) * 8)
    path = log.snapshot_path("s")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 1
    path.write_bytes(bytes(data[:-10] if damage == "cut" else data[:12] if damage == "short" else data))
    with pytest.raises(SnapshotCorruptError):
        log.get_snapshot("s")


def test_snapshot_bytes_round_trip_bit_exact():
    state = _state(5)
    mark, last_seq, back = decode_snapshot(encode_snapshot(state, MARK, 9))
    assert (mark, last_seq, back["meta"]) == (MARK, 9, state["meta"])
    for name, t in state["tensors"].items():
        assert back["tensors"][name].dtype == t.dtype and torch.equal(back["tensors"][name], t), name


def _snapshotted(store, compact: bool) -> None:
    store.append("s", _before() + [MarkRecord(MARK, 1)] + _after())
    store.put_snapshot("s", MARK, encode_snapshot(_state(2), MARK, 1))
    if compact:
        store.truncate_before("s", MARK)


@pytest.mark.parametrize("compact", [False, True])
def test_plan_imports_the_snapshot_and_replays_only_the_tail(store, compact):
    _snapshotted(store, compact)
    plan = plan_rebuild(store, "s")
    assert plan.mark == MARK and plan.last_seq == 1 and plan.records == _after()
    assert plan.state["meta"]["frames"] == 2
    assert (plan.whole is None) == compact


def test_plan_without_snapshot_replays_the_whole_log(store):
    store.append("s", _before() + [MarkRecord(MARK, 1)] + _after())  # a mark whose snapshot never landed
    plan = plan_rebuild(store, "s")
    assert plan.state is None and plan.last_seq == -1 and plan.records == _before() + [MarkRecord(MARK, 1)] + _after()


def test_plan_with_a_stale_or_undecodable_snapshot_replays_a_whole_log(store):
    _snapshotted(store, compact=False)
    store.put_snapshot("s", MARK + 5, encode_snapshot(_state(2), MARK + 5, 1))  # its mark is not in the log
    plan = plan_rebuild(store, "s")
    assert plan.state is None and len(plan.records) == 9 and "not in the log" in plan.problem
    store.put_snapshot("s", MARK, b"not a torch file")
    plan = plan_rebuild(store, "s")
    assert plan.state is None and len(plan.records) == 9 and "decode" in plan.problem


def test_plan_of_a_compacted_log_without_a_usable_snapshot_is_data_loss(store):
    _snapshotted(store, compact=True)
    store.put_snapshot("s", MARK, b"garbage")
    with pytest.raises(SnapshotLostError):
        plan_rebuild(store, "s")


def test_plan_of_a_compacted_log_with_a_corrupt_snapshot_file_is_data_loss(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    _snapshotted(log, compact=True)
    path = log.snapshot_path("s")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotLostError):
        plan_rebuild(log, "s")
