"""The on-disk form of one snapshot slot of `DiskFrameLog`: a base (`<stream>.snap`) or a delta
(`<stream>.snap.<k>`, k = 1, 2, ...: `snapshots.py`), each

    magic b"MRS1" | mark i64 | blob length u64 | crc32(blob) u32 | crc32(the 24 bytes before) u32 | blob

Writing (`write_slot`) streams the blob: its chunks (a `bytes`, or any iterable of bytes-like
pieces, `snapshot_codec.encode_chunks`) are written to `<name>.tmp` as they come, each folded into
the running length and crc32 on the way and none joined to another, after a 28-byte placeholder
header of zeros; once the last chunk is written the real header is written over the placeholder
(pwrite at offset 0). Then the store's `_replace` fsyncs the file, renames it over the old slot
and fsyncs the directory. The layout is the one slots always had: slots written whole before
read as they did. Memory: one chunk at a time, whatever the blob's size.

Invariants:
- A crash at any point leaves the old slot or the new one, whole: the slot's name changes only by
  the rename, after the header is patched and the file fsynced. A chunk iterator that raises
  leaves the old slot too (the temp file is removed).
- A temp file whose writer died keeps its placeholder (magic 0000), so it fails its checksums
  were it ever taken for a slot.
- A slot that fails its checksums (a byte changed anywhere, header or blob, or cut short) raises
  `SnapshotCorruptError`, never reads as another snapshot.

Reading (`read_slot`) maps the file copy-on-write (a private mapping: nothing written through it
reaches the file, and nothing is copied until a page is written, which no reader does) and checks
it chunk by chunk; the blob it returns is a memoryview of the mapping: its bytes are the page
cache's, not a copy in the process's memory. The checksum pass (`crc32_of`) unmaps each chunk's
pages behind it (`drop_pages`), so the process's resident memory grows by about one chunk, not by
the blob (mapped file pages count in RSS while mapped). The decoder (`snapshot_codec`) then makes
tensors that are views of the mapping (zero copy: the import into the engine's pool is the one
copy the bytes get), which keep the mapping open while they live.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from mosaic_ray.runtime.durability.frame_log import SnapshotBlob, SnapshotCorruptError, blob_chunks

SNAP_MAGIC = b"MRS1"
_SNAP_HEAD = struct.Struct("<4sqQII")  # magic, mark, length, blob crc, header crc
SNAP_SUFFIX = ".snap"
CHUNK_BYTES = 8 << 20  # the unit of streamed writes, checksums and copies


def write_all(fd: int, data) -> None:
    """os.write until every byte of `data` (bytes-like) is written."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def drop_pages(view: memoryview, start: int, end: int) -> None:
    """Unmap the pages of view[start:end] from this process when `view` is a slot's blob
    (`read_slot`: the mapping after its header), so that reading a blob through leaves no more
    than a chunk of it resident; the pages stay in the page cache, and a later read maps them
    again. A no-op for other buffers. Never changes what the view reads (the mapping is
    read-only), whatever `view` is: a wrong range only costs page faults."""
    mapped = view.obj
    if not isinstance(mapped, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or end <= start:
        return
    skip = len(mapped) - len(view)  # the bytes before the blob
    low = (skip + start) // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, low, min(len(mapped), skip + end) - low)


def crc32_of(data, chunk: int = CHUNK_BYTES) -> int:
    """crc32 of a bytes-like object, `chunk` bytes at a time (a mapped blob is read as it goes,
    and `drop_pages`' behind)."""
    view, crc = memoryview(data).cast("B"), 0
    for start in range(0, len(view), chunk):
        crc = zlib.crc32(view[start : start + chunk], crc)
        drop_pages(view, start, start + chunk)
    return crc


class CrcTally:
    """Iterates the chunks of `blob` (`blob_chunks`), counting their bytes and crc32 as they pass:
    once iterated, `length` and `crc` are those of the whole blob. Wrapping a tally again reuses
    it (the count is taken once)."""

    def __init__(self, blob: SnapshotBlob) -> None:
        self._blob, self.length, self.crc = blob, 0, 0

    def __iter__(self) -> Iterator[memoryview]:
        for chunk in blob_chunks(self._blob):
            view = memoryview(chunk).cast("B")
            self.length += len(view)
            self.crc = zlib.crc32(view, self.crc)
            yield view


def _header(mark: int, length: int, crc: int) -> bytes:
    first = struct.pack("<4sqQI", SNAP_MAGIC, mark, length, crc)
    return first + struct.pack("<I", zlib.crc32(first))


def write_slot(fd: int, mark: int, blob: SnapshotBlob) -> CrcTally:
    """Stream a slot into the empty file `fd`: placeholder header, the chunks, then the header
    patched in place. Returns the tally (the blob's length and crc32 as written)."""
    write_all(fd, bytes(_SNAP_HEAD.size))
    tally = blob if isinstance(blob, CrcTally) else CrcTally(blob)
    for view in tally:
        write_all(fd, view)
    head = _header(mark, tally.length, tally.crc)
    if os.pwrite(fd, head, 0) != len(head):
        raise OSError(f"short write of a snapshot header ({len(head)} bytes)")
    return tally


def read_slot(path: Path, what: str) -> tuple[int, memoryview] | None:
    """(mark, blob) of the slot at `path`, None when there is none; `what` names it in errors.
    The blob is a memoryview of the file mapped copy-on-write, checksummed before it is returned."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < _SNAP_HEAD.size:
            raise SnapshotCorruptError(f"{what} is cut short ({size} bytes)")
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # writable views for torch, never the file
    finally:
        os.close(fd)
    view = memoryview(mapped)
    magic, mark, length, crc, head_crc = _SNAP_HEAD.unpack_from(view)
    blob = view[_SNAP_HEAD.size :]
    good = (magic == SNAP_MAGIC and zlib.crc32(view[:24]) == head_crc and length == len(blob)
            and crc32_of(blob) == crc)
    view.release()
    if not good:
        blob.release()
        mapped.close()
        raise SnapshotCorruptError(f"{what} fails its checksum")
    return mark, blob


def delta_paths(root: Path, stream_id: str) -> list[tuple[int, Path]]:
    """The delta slots of a stream on disk, (k, path) by k: `<stream_id>.snap.<k>` with k a
    plain decimal (temp files, `.snap.<k>.tmp`, are not slots)."""
    prefix = f"{stream_id}{SNAP_SUFFIX}."
    found = []
    for p in root.iterdir():
        rest = p.name[len(prefix):] if p.name.startswith(prefix) else ""
        if rest.isdigit() and rest == str(int(rest)):
            found.append((int(rest), p))
    return sorted(found)
