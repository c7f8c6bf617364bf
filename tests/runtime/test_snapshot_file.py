"""Snapshot slots written in pieces (`snapshot_file.py`, both stores through `put_snapshot` /
`put_delta`): chunks of every bytes-like type read back as their concatenation, in the layout
slots always had (a slot written whole before reads the same); a byte changed anywhere (header,
blob start, middle, end) or a file cut short or grown raises `SnapshotCorruptError`; a chunk
iterator that raises mid-write (a crash) or a failing header patch leaves the old slot intact
and no temp file; and the verification after a write compares length and crc32, catching a
store that gives back other bytes."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from mosaic_ray.runtime.durability.frame_log import LogWriteError, MemoryFrameLog, SnapshotCorruptError
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
from mosaic_ray.runtime.durability.snapshot_file import CHUNK_BYTES, CrcTally, crc32_of
from mosaic_ray.runtime.actors.snapshots import StreamSnapshots

BLOB = bytes(range(256)) * 40 + b"tail"


def _pieces(blob: bytes) -> list:
    """`blob` cut unevenly, as bytes, bytearray and memoryview chunks, with empty ones among them."""
    cuts = [0, 1, 1, 300, 4096, 7000, len(blob)]
    kinds = [bytes, bytearray, memoryview]
    return [kinds[i % 3](blob[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _put(store, slot: int, mark: int, blob) -> None:
    if slot:
        store.put_delta("s", slot, mark, blob)
    else:
        store.put_snapshot("s", mark, blob)


def _get(store, slot: int):
    return store.get_delta("s", slot) if slot else store.get_snapshot("s")


@pytest.mark.parametrize("slot", [0, 2])
def test_contract_a_slot_written_in_pieces_reads_back_whole(store, slot):
    _put(store, slot, 5, iter(_pieces(BLOB)))  # a one-pass iterator
    mark, back = _get(store, slot)
    assert mark == 5 and back == BLOB
    _put(store, slot, 6, iter(()))  # an empty part
    assert _get(store, slot) == (6, b"")


def test_disk_slot_layout_is_unchanged_and_an_old_slot_reads(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", -3, _pieces(BLOB))
    first = struct.pack("<4sqQI", b"MRS1", -3, len(BLOB), zlib.crc32(BLOB))
    whole = first + struct.pack("<I", zlib.crc32(first)) + BLOB  # how slots were written whole
    assert log.snapshot_path("s").read_bytes() == whole
    log.delta_path("s", 1).write_bytes(whole)
    assert log.get_delta("s", 1) == (-3, BLOB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.snap", "s.snap.1"]  # no temp file


HEAD = 28


@pytest.mark.parametrize("at", [0, 4, 12, 20, 24, HEAD, HEAD + len(BLOB) // 2, -1])
def test_disk_a_byte_changed_anywhere_raises(tmp_path, at):
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", 9, _pieces(BLOB))
    path = log.snapshot_path("s")
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError):
        log.get_snapshot("s")


@pytest.mark.parametrize("change", [lambda d: d[:-1], lambda d: d + b"\0", lambda d: d[:HEAD - 1], lambda d: b""])
def test_disk_a_slot_cut_short_or_grown_raises(tmp_path, change):
    log = DiskFrameLog(tmp_path, "always")
    log.put_delta("s", 1, 9, _pieces(BLOB))
    path = log.delta_path("s", 1)
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(SnapshotCorruptError):
        log.get_delta("s", 1)


class Crash(Exception):
    pass


def _crashing(blob: bytes, after: int):
    """The chunks of `blob`, raising once `after` of them were handed out (a crash mid-write)."""
    for i, chunk in enumerate(_pieces(blob)):
        if i == after:
            raise Crash("killed mid-write")
        yield chunk


@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("after", [0, 3])
def test_contract_a_write_that_dies_midway_leaves_the_old_slot(store, slot, after):
    _put(store, slot, 1, b"old" * 100)
    with pytest.raises(Crash):
        _put(store, slot, 2, _crashing(BLOB, after))
    assert _get(store, slot) == (1, b"old" * 100)
    if isinstance(store, DiskFrameLog):
        assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]
    _put(store, slot, 3, _pieces(BLOB))  # the next write goes through
    assert _get(store, slot) == (3, BLOB)


def test_disk_a_failing_header_patch_leaves_the_old_slot(tmp_path, monkeypatch):
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", 1, b"old")

    def fail(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "pwrite", fail)
    with pytest.raises(LogWriteError):
        log.put_snapshot("s", 2, _pieces(BLOB))
    monkeypatch.undo()
    assert log.get_snapshot("s") == (1, b"old") and not (tmp_path / "s.snap.tmp").exists()


def test_a_temp_file_left_by_a_dead_writer_is_never_a_slot(tmp_path, monkeypatch):
    """Killed between the chunks and the header patch: the temp file holds the placeholder, which
    fails the checksums even if it were renamed over the slot."""
    log = DiskFrameLog(tmp_path, "always")
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: len(data))  # the patch never lands
    monkeypatch.setattr(os, "replace", lambda *_: None)  # nor the rename: the temp file stays
    log.put_snapshot("s", 4, _pieces(BLOB))
    monkeypatch.undo()
    tmp = tmp_path / "s.snap.tmp"
    assert tmp.read_bytes()[:HEAD] == bytes(HEAD) and log.get_snapshot("s") is None
    os.replace(tmp, log.snapshot_path("s"))
    with pytest.raises(SnapshotCorruptError):
        log.get_snapshot("s")


def test_tally_and_chunked_crc_agree_with_zlib():
    tally = CrcTally(_pieces(BLOB))
    assert b"".join(tally) == BLOB and (tally.length, tally.crc) == (len(BLOB), zlib.crc32(BLOB))
    assert crc32_of(BLOB, chunk=7) == zlib.crc32(BLOB) == crc32_of(memoryview(BLOB))


class _Flipping(MemoryFrameLog):
    """A store that gives back one byte other than it was given."""

    def get_snapshot(self, stream_id):
        mark, blob = super().get_snapshot(stream_id)
        return mark, blob[:-1] + bytes([blob[-1] ^ 1])


def test_the_verification_after_a_write_compares_length_and_crc():
    for store, ok in ((MemoryFrameLog(), True), (_Flipping(), False)):
        snapshots = StreamSnapshots(store, 1, call=None, export=None, owns=None, hold_timeout_s=1.0)
        if ok:
            assert snapshots._write_verified("s", 7, iter(_pieces(BLOB))) == len(BLOB)
        else:
            with pytest.raises(SnapshotCorruptError):
                snapshots._write_verified("s", 7, iter(_pieces(BLOB)))


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            inside = line.rstrip().endswith(str(path))
        elif inside and head[0] == "Rss:":
            total += int(head[1]) << 10
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_disk_reading_a_blob_through_keeps_about_a_chunk_of_it_resident(tmp_path):
    log = DiskFrameLog(tmp_path, "always")
    blob = os.urandom(1 << 20) * 48  # 48 MiB
    log.put_snapshot("s", 1, blob)
    mark, back = log.get_snapshot("s")  # checksummed through, chunk by chunk
    path = log.snapshot_path("s")
    assert mark == 1 and _mapped_rss(path) <= CHUNK_BYTES + (1 << 20)
    assert crc32_of(back) == zlib.crc32(blob)
    assert _mapped_rss(path) <= CHUNK_BYTES + (1 << 20)
    assert back == blob  # pages dropped behind still read (mapped again from the page cache)
    assert _mapped_rss(path) >= 40 << 20  # read whole by ==: all resident (the probe sees them)
