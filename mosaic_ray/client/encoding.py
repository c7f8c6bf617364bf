"""Frames -> request bodies: JPEG-encoded, packed into one msgpack batch per request.

The wire format is the server's `FrameBatchIn`: {"seq": int, "frames": [{"ts": float, "jpeg": bytes}]}.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import msgpack
import numpy as np
from PIL import Image

MSGPACK_TYPE = "application/msgpack"


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """RGB uint8 [H, W, 3] -> JPEG bytes (4:2:0, as cameras send)."""
    out = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pack_batch(seq: int, timestamps: Sequence[float], jpegs: Sequence[bytes]) -> bytes:
    frames = [{"ts": float(t), "jpeg": j} for t, j in zip(timestamps, jpegs, strict=True)]
    return msgpack.packb({"seq": int(seq), "frames": frames}, use_bin_type=True)


def encode_batch(seq: int, frames: Sequence[np.ndarray], timestamps: Sequence[float], quality: int = 85) -> bytes:
    return pack_batch(seq, timestamps, [encode_jpeg(f, quality) for f in frames])
