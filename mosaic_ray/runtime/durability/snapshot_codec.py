"""The stored form of one snapshot part (a base or a delta, `snapshot_plan.py`), encoded and
decoded without a second copy of it in memory.

A part is {"format", "mark", "last_seq", "base", "index", "meta", "tensors"}: an engine export
(`engine/stream_export.py`: plain-data "meta", {name: Tensor} "tensors"), the mark it was taken at,
the stream's seq then, and for a delta the mark of its base and its slot ("base" None and
"index" 0 for a base).

Format 2 (written since issue 20):

    b"MRT2" | header length u64 | header | per tensor: zero padding to a multiple of 64, its bytes

The header is torch.save of the part with "tensors" a list of (name, dtype, shape, nbytes), in the
export's order, and "byteorder" (`sys.byteorder`); each tensor's bytes are its elements in
row-major order, native byte order, bit-exact for every dtype, starting at the next multiple of 64
from the blob's start. The blob ends at the last tensor's last byte: a decoder checks that the
sizes add up to its length exactly.

Format 1 (written before): torch.save of the part itself, a zip file (b"PK\\x03\\x04"...). It can
only be pushed into a writer whole-storage by whole-storage (a device tensor copied to the host
whole, a view's entire base storage saved), not pulled in bounded pieces, hence format 2.
`decode_part` reads both.

Memory. `encode_chunks` yields the blob in pieces, none joined: the magic and header length, the
header, then per tensor its padding and its bytes as memoryviews of at most `chunk_bytes` each: of
the tensor itself when it is contiguous on the host (no copy), of a host copy of one piece at a
time for a device tensor, of one block of rows at a time for a non-contiguous one. So encoding
costs one piece (and the header) beyond the export's own tensors, whatever the part's size.
`decode_part` takes any bytes-like blob. From a writable one (the copy-on-write mapping of a slot
file that `DiskFrameLog` returns, a bytearray) each tensor whose bytes are aligned for its dtype
is a view of the blob, not a copy: the bulk of a part (bf16 K/V, float32 tables; the blob starts
28 bytes into its file, so int64 tensors land 4 bytes off and are copied) costs no memory of its
own and no page-faulting of fresh allocations; the import into the engine's pool is the one copy
its bytes get. On a 2-core VM, 0.5 GiB of K/V: decoded by copying in 0.44-2.1 s (first-touch
faults of the fresh tensors), by views in ~0 s. The views keep the mapping open while they live
(its pages are the page cache's). From a read-only blob (bytes) and for the unaligned tensors,
each tensor's bytes are copied once, `CHUNK_BYTES` at a time, unmapping a mapping's pages behind
(`drop_pages`); such tensors are contiguous and share no storage.
"""

from __future__ import annotations

import io
import math
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mosaic_ray.runtime.durability.frame_log import SnapshotCorruptError
from mosaic_ray.runtime.durability.snapshot_file import CHUNK_BYTES, drop_pages

SNAPSHOT_FORMAT = 2  # written; 1 is read too. "base" and "index" are optional: a part without them is a base
FORMAT_MAGIC = b"MRT2"
_PREFIX = struct.Struct("<4sQ")  # magic, header length
ALIGN = 64
_ZEROS = bytes(ALIGN)


def _padding(offset: int) -> int:
    return -offset % ALIGN


def _pieces(t: torch.Tensor, chunk: int) -> Iterator[memoryview]:
    """The bytes of `t` in row-major order as memoryviews of at most `chunk` bytes (a block of
    rows larger than that for a non-contiguous tensor whose one row is)."""
    t = t.detach()
    if t.is_contiguous():
        flat = t.reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), chunk):
            piece = flat[start : start + chunk]
            yield memoryview(piece.cpu().numpy())  # a host tensor's own bytes; a device one's copy
        return
    row = math.prod(t.shape[1:]) * t.element_size()
    rows = max(1, chunk // max(1, row))
    for start in range(0, t.shape[0], rows):
        yield from _pieces(t[start : start + rows].contiguous(), chunk)


def encode_chunks(state: dict[str, Any], mark: int, last_seq: int, base: int | None = None, index: int = 0,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
    """An engine export or part ({"meta", "tensors"}) as format 2, in pieces of at most
    `chunk_bytes` (the header excepted). `base`, `index`: the base mark and slot of a delta. The
    tensors must not change until the iteration ends (an export's are its own copies)."""
    tensors = state["tensors"]
    listing = [(name, t.dtype, tuple(t.shape), t.numel() * t.element_size()) for name, t in tensors.items()]
    out = io.BytesIO()
    torch.save({"format": SNAPSHOT_FORMAT, "mark": mark, "last_seq": last_seq, "base": base, "index": index,
                "byteorder": sys.byteorder, "meta": state["meta"], "tensors": listing}, out)
    header = out.getvalue()
    yield _PREFIX.pack(FORMAT_MAGIC, len(header))
    yield header
    offset = _PREFIX.size + len(header)
    for (_, _, _, nbytes), t in zip(listing, tensors.values()):
        if pad := _padding(offset):
            yield _ZEROS[:pad]
        offset += pad + nbytes
        yield from _pieces(t, chunk_bytes)


def encode_snapshot(state: dict[str, Any], mark: int, last_seq: int, base: int | None = None,
                    index: int = 0) -> bytes:
    """`encode_chunks` joined: the whole blob in memory (small parts, tests, benchmarks)."""
    return b"".join(encode_chunks(state, mark, last_seq, base, index))


@dataclass(slots=True)
class SnapshotPart:
    mark: int
    last_seq: int
    base: int | None  # the base's mark, for a delta
    index: int  # 0: a base
    state: dict[str, Any]


class _ViewReader(io.RawIOBase):
    """A seekable, read-only file over a memoryview (torch.load reads format 1 through it,
    each storage straight into its tensor by `readinto`)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        dst = memoryview(buffer).cast("B")
        n = max(0, min(len(dst), len(self._view) - self._pos))
        _copy(dst, self._view, self._pos, n)
        self._pos += n
        return n


def _copy(dst: memoryview, src: memoryview, at: int, n: int) -> None:
    """Copy src[at : at + n] to dst[:n], `CHUNK_BYTES` at a time (other threads run between
    pieces; a mapped blob's pages are dropped behind, `drop_pages`)."""
    for start in range(0, n, CHUNK_BYTES):
        end = min(n, start + CHUNK_BYTES)
        dst[start:end] = src[at + start : at + end]
        drop_pages(src, at + start, at + end)


def _load(view: memoryview) -> dict:
    return torch.load(_ViewReader(view), map_location="cpu", weights_only=True)


def _tensor_at(view: memoryview, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """The flat tensor of view[offset : offset + nbytes]: a view of the blob when it is writable
    and the bytes are aligned for `dtype`, else a copy."""
    if nbytes and not view.readonly:
        piece = torch.frombuffer(view, dtype=torch.uint8, count=nbytes, offset=offset)
        if piece.data_ptr() % dtype.itemsize == 0:
            return piece.view(dtype)
    out = torch.empty(nbytes, dtype=torch.uint8)
    _copy(memoryview(out.numpy()), view, offset, nbytes)
    return out.view(dtype)


def _decode_v2(view: memoryview) -> dict[str, Any]:
    if len(view) < _PREFIX.size:
        raise SnapshotCorruptError(f"snapshot cut short ({len(view)} bytes)")
    _, hlen = _PREFIX.unpack_from(view)
    offset = _PREFIX.size + hlen
    if offset > len(view):
        raise SnapshotCorruptError(f"snapshot header of {hlen} bytes runs past its end ({len(view)} bytes)")
    body = _load(view[_PREFIX.size : offset])
    if body.get("byteorder") != sys.byteorder:
        raise SnapshotCorruptError(f"snapshot in {body.get('byteorder')!r} byte order, this host is {sys.byteorder}")
    tensors = {}
    for name, dtype, shape, nbytes in body["tensors"]:
        offset += _padding(offset)
        if nbytes != math.prod(shape) * dtype.itemsize or offset + nbytes > len(view):
            raise SnapshotCorruptError(f"snapshot tensor {name!r} ({nbytes} bytes at {offset}) does not fit")
        tensors[name] = _tensor_at(view, offset, nbytes, dtype).reshape(shape)
        offset += nbytes
    if offset != len(view):
        raise SnapshotCorruptError(f"snapshot of {len(view)} bytes holds {offset}")
    body["tensors"] = tensors
    return body


def decode_part(blob) -> SnapshotPart:
    """A part's bytes (format 2 or 1, any bytes-like object) back; plain data and tensors only."""
    view = memoryview(blob).cast("B")
    if view[:4] == FORMAT_MAGIC:
        body, expected = _decode_v2(view), SNAPSHOT_FORMAT
    else:
        body, expected = _load(view), 1
    if body.get("format") != expected:
        raise SnapshotCorruptError(f"snapshot format {body.get('format')!r}, expected {expected}")
    return SnapshotPart(int(body["mark"]), int(body["last_seq"]), body.get("base"), int(body.get("index", 0)),
                        {"meta": body["meta"], "tensors": body["tensors"]})


def decode_snapshot(blob) -> tuple[int, int, dict[str, Any]]:
    """(mark, last_seq, engine state) of a part's bytes."""
    part = decode_part(blob)
    return part.mark, part.last_seq, part.state
