"""The streamed snapshot encoding (`snapshot_codec.py`): a real tiny-engine export, encoded in
small chunks, decodes to the same tensors bit for bit and imports to a stream that answers the
same; every dtype and layout (bf16, bool, 0-dim, empty, non-contiguous, a view of a larger
storage) round-trips; format 1 blobs (torch.save, written before) still decode; a blob whose
sizes do not add up raises; and the memory bound: encoding, writing and verifying a 200 MB
snapshot, then reading and decoding it, never holds a Python object near its size."""

from __future__ import annotations

import io
import tracemalloc

import pytest
import torch

from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.model.registry import load_model
from mosaic_ray.runtime.durability.frame_log import SnapshotCorruptError
from mosaic_ray.runtime.durability.frame_log_disk import DiskFrameLog
from mosaic_ray.runtime.durability.snapshot_codec import (
    ALIGN,
    FORMAT_MAGIC,
    decode_part,
    decode_snapshot,
    encode_chunks,
    encode_snapshot,
)
from mosaic_ray.runtime.actors.snapshots import StreamSnapshots
from tests.engine.engine_fixtures import frames, make_engine

MARK = 1_700_000_000_123_456_789
KW = dict(window=24, sink=4, budget=30)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (a pool's unused rows may hold NaN, which equals nothing)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.dtype.is_floating_point else t


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name, t in a.items():
        got = b[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        assert torch.equal(_bits(got), _bits(t)), name


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu")


@pytest.mark.parametrize("method", ["cluster", "full"])
def test_a_tiny_engine_export_round_trips_in_small_chunks_and_answers_the_same(tiny, method, tmp_path):
    src = make_engine(tiny, method, **KW)
    src.open_stream("s")
    src.append_frames("s", frames(16, seed=1), [float(i) for i in range(16)])
    src.append_text("s", "a red car passes the gate", 16.5)
    export = src.export_stream("s")
    chunk = 4096
    chunks = list(encode_chunks(export, MARK, 15, chunk_bytes=chunk))
    assert bytes(chunks[0][:4]) == FORMAT_MAGIC
    assert max(memoryview(c).nbytes for c in chunks[2:]) <= chunk  # after the prefix and header
    assert len(chunks) > len(export["tensors"]) + 2  # the pool's tensors span many chunks
    blob = b"".join(chunks)
    assert blob == encode_snapshot(export, MARK, 15)  # the chunk size changes nothing on disk
    mark, last_seq, back = decode_snapshot(blob)
    assert (mark, last_seq, back["meta"]) == (MARK, 15, export["meta"])
    _same(export["tensors"], back["tensors"])
    log = DiskFrameLog(tmp_path, "always")  # streamed to a slot and read back through its mapping
    log.put_snapshot("s", MARK, encode_chunks(export, MARK, 15, chunk_bytes=chunk))
    got = log.get_snapshot("s")
    assert got[0] == MARK and got[1] == blob
    part = decode_part(got[1])
    _same(export["tensors"], part.state["tensors"])
    dst = make_engine(tiny, method, **KW)
    dst.import_stream("s", part.state)
    q = AskRequest("Describe the scene.", max_tokens=8)
    assert dst.answer("s", q).token_ids == src.answer("s", q).token_ids


def test_every_dtype_and_layout_round_trips_bit_exact():
    big = torch.arange(1000, dtype=torch.float32)
    tensors = {
        "bf16": torch.randn(7, 3).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "f64": torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.float64),
        "bool": torch.tensor([True, False, True]),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "i64": torch.tensor([2**62, -1]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.int32),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "view": big[10:20],  # of a larger storage: only its own bytes are written
        "strided": torch.arange(40.0).reshape(8, 5)[::2, 1:],
    }
    state = {"meta": {"counters": {"frames": 3}, "method": "cluster", "plain": {"index.capacity": 64}},
             "tensors": tensors}
    blob = b"".join(encode_chunks(state, MARK, 2, base=MARK - 1, index=3, chunk_bytes=16))
    assert len(blob) < big.numel() * 4  # the view's base storage is not in it
    part = decode_part(blob)
    assert (part.mark, part.last_seq, part.base, part.index) == (MARK, 2, MARK - 1, 3)
    assert part.state["meta"] == state["meta"]
    _same(tensors, part.state["tensors"])
    assert all(t.is_contiguous() for t in part.state["tensors"].values())
    assert torch.isnan(part.state["tensors"]["f64"][0])


def _v1(state: dict, mark: int, last_seq: int, base=None, index: int = 0) -> bytes:
    """A part as snapshots were written before format 2: torch.save of the whole part."""
    out = io.BytesIO()
    torch.save({"format": 1, "mark": mark, "last_seq": last_seq, "base": base, "index": index,
                "meta": state["meta"], "tensors": state["tensors"]}, out)
    return out.getvalue()


def test_format_1_blobs_still_decode_from_bytes_and_from_a_mapped_slot(tmp_path):
    state = {"meta": {"frames": 4}, "tensors": {"k": torch.randn(4, 8).to(torch.bfloat16),
                                                 "ids": torch.arange(4)}}
    old = _v1(state, MARK, 3, base=MARK - 9, index=2)
    part = decode_part(old)
    assert (part.mark, part.last_seq, part.base, part.index) == (MARK, 3, MARK - 9, 2)
    _same(state["tensors"], part.state["tensors"])
    log = DiskFrameLog(tmp_path, "always")
    log.put_delta("s", 2, MARK, old)
    _same(state["tensors"], decode_part(log.get_delta("s", 2)[1]).state["tensors"])


@pytest.mark.parametrize("damage", ["cut", "extra", "header_length"])
def test_a_blob_whose_sizes_do_not_add_up_raises(damage):
    state = {"meta": {}, "tensors": {"a": torch.arange(100), "b": torch.ones(3, 3)}}
    blob = bytearray(encode_snapshot(state, MARK, 1))
    if damage == "cut":
        blob = blob[:-8]
    elif damage == "extra":
        blob += bytes(ALIGN)
    else:
        blob[4:12] = (len(blob) + 1).to_bytes(8, "little")
    with pytest.raises(SnapshotCorruptError):
        decode_part(bytes(blob))


TOTAL = 200 << 20  # bytes of tensors in the large snapshot
LIMIT = 50 << 20  # the most Python memory encoding, writing, verifying or decoding it may take


def test_a_200_mb_snapshot_is_written_and_read_back_in_bounded_memory(tmp_path):
    # tracemalloc sees Python objects (bytes, bytearray, BytesIO, numpy arrays), not tensors: a
    # whole blob (the old encode_snapshot's, or a file read whole) would show as 200 MB of them.
    tensors = {"pool.kv": torch.randn(TOTAL // 4 // 2 // 1024, 1024),
               "pool.pos": torch.arange(TOTAL // 2 // 8), "resident.k": torch.randn(64, 64)}
    state = {"meta": {"method": "cluster"}, "tensors": tensors}
    log = DiskFrameLog(tmp_path, "always")
    snapshots = StreamSnapshots(log, 1, call=None, export=None, owns=None, hold_timeout_s=1.0)
    tracemalloc.start()
    try:
        nbytes = snapshots._write_verified("s", MARK, encode_chunks(state, MARK, 7))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        mark, blob = log.get_snapshot("s")
        part = decode_part(blob)
        del blob
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\nSNAPSHOT {nbytes / 2**20:.0f} MiB: write peak {write_peak / 2**20:.1f} MiB, "
          f"read peak {read_peak / 2**20:.1f} MiB (Python objects)")
    assert nbytes > TOTAL and log.snapshot_path("s").stat().st_size == nbytes + 28  # the slot header
    assert write_peak < LIMIT and read_peak < LIMIT
    assert mark == MARK and part.last_seq == 7
    _same(tensors, part.state["tensors"])


def test_a_mapped_slot_decodes_to_views_of_the_mapping_and_writes_never_reach_the_file(tmp_path):
    # bf16 and float32 land aligned in a slot file (the blob starts 28 bytes in): views, no copy;
    # int64 lands 4 bytes off: copied. Writing through a view changes neither the file nor a
    # second read of it (the mapping is copy-on-write).
    tensors = {"pool.kv": torch.randn(64, 2, 4, 8).to(torch.bfloat16), "pool.time": torch.rand(64, 4),
               "pool.order": torch.arange(256).view(64, 4)}
    log = DiskFrameLog(tmp_path, "always")
    log.put_snapshot("s", MARK, encode_chunks({"meta": {}, "tensors": tensors}, MARK, 3))
    before = log.snapshot_path("s").read_bytes()
    _, blob = log.get_snapshot("s")
    start = torch.frombuffer(blob, dtype=torch.uint8).data_ptr()
    got = decode_part(blob).state["tensors"]
    _same(tensors, got)
    inside = [n for n, t in got.items() if start <= t.data_ptr() < start + len(blob)]
    del blob
    assert inside == ["pool.kv", "pool.time"]  # views of the mapping; the int64 one a copy
    assert got["pool.time"].data_ptr() % 4 == 0 and got["pool.order"].data_ptr() % 8 == 0
    got["pool.kv"].zero_()
    got["pool.time"].fill_(7.0)
    assert log.snapshot_path("s").read_bytes() == before
    _same(tensors, decode_part(log.get_snapshot("s")[1]).state["tensors"])


def test_a_read_only_blob_decodes_to_copies():
    tensors = {"a": torch.randn(5, 3), "b": torch.arange(7)}
    blob = encode_snapshot({"meta": {}, "tensors": tensors}, MARK, 1)  # bytes: read-only
    got = decode_part(blob).state["tensors"]
    _same(tensors, got)
    got["a"].zero_()  # its own memory
    _same(tensors, decode_part(blob).state["tensors"])
