"""The on-disk form of one snapshot slot of `DiskFrameLog`: a base (`<stream>.snap`) or a delta
(`<stream>.snap.<k>`, k = 1, 2, ...: `snapshots.py`), each

    magic b"MRS1" | mark i64 | blob length u64 | crc32(blob) u32 | crc32(the 24 bytes before) u32 | blob

written to `<name>.tmp`, fsynced, renamed over the old one, directory fsynced (the store's
`_replace`): a crash at any point leaves the old slot or the new one, whole. A slot that fails
its checksums raises `SnapshotCorruptError`, never reads as another snapshot.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from mosaic_ray.runtime.frame_log import SnapshotCorruptError

SNAP_MAGIC = b"MRS1"
_SNAP_HEAD = struct.Struct("<4sqQII")  # magic, mark, length, blob crc, header crc
SNAP_SUFFIX = ".snap"


def encode_slot(mark: int, blob: bytes) -> list[bytes]:
    """The parts of a slot file, header first."""
    first = struct.pack("<4sqQI", SNAP_MAGIC, mark, len(blob), zlib.crc32(blob))
    return [first, struct.pack("<I", zlib.crc32(first)), blob]


def read_slot(path: Path, what: str) -> tuple[int, bytes] | None:
    """(mark, blob) of the slot at `path`, None when there is none; `what` names it in errors."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _SNAP_HEAD.size:
        raise SnapshotCorruptError(f"{what} is cut short ({len(data)} bytes)")
    magic, mark, length, crc, head_crc = _SNAP_HEAD.unpack_from(data)
    blob = data[_SNAP_HEAD.size :]
    if magic != SNAP_MAGIC or zlib.crc32(data[:24]) != head_crc or length != len(blob) or zlib.crc32(blob) != crc:
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
