"""Frames travel compressed from the ingress to their shard and are decoded there.

Why there: a raw 224x224 RGB frame is 150 KB and a 1080p one 6 MB, ten to twenty times its JPEG.
Decoding in the ingress would push the raw pixels through Ray's object store, and across the
network whenever the shard sits on another node. So the ingress only parses and checks (format,
size from the image header, pixel limit, `inspect`), and the shard decodes just before the engine
needs the pixels, on a few threads (PIL releases the GIL while decoding).

Invariant: `decode` of an `EncodedFrame` that passed `inspect` yields an RGB uint8 [H, W, 3] array
of the inspected size, or raises `MalformedFrameError` (the image data is corrupt past its header).
"""

from __future__ import annotations

import io
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.errors import MalformedFrameError

FORMATS = {"jpeg": "JPEG", "png": "PNG"}


@dataclass(slots=True, frozen=True)
class EncodedFrame:
    kind: str  # "jpeg" | "png" | "raw"
    data: bytes
    shape: tuple[int, int, int]  # [H, W, 3], from the header (or given, for raw)


def inspect(kind: str, data: bytes, max_pixels: int, shape: list[int] | None = None) -> EncodedFrame:
    """Check a frame without decoding its pixels; raises `MalformedFrameError` / `InvalidInputError`."""
    if kind == "raw":
        h, w, c = shape
        if c != 3 or h < 1 or w < 1:
            raise InvalidInputError(f"raw frames are [H, W, 3] uint8, got shape {shape}")
        _check_pixels(h, w, max_pixels)
        if len(data) != h * w * 3:
            raise InvalidInputError(f"raw frame has {len(data)} bytes, shape {shape} needs {h * w * 3}")
        return EncodedFrame("raw", data, (h, w, 3))
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception:
        raise MalformedFrameError(f"not a decodable {FORMATS[kind]} image") from None
    if img.format != FORMATS[kind]:
        raise InvalidInputError(f"expected a {FORMATS[kind]} image, got {img.format}")
    w, h = img.size
    _check_pixels(h, w, max_pixels)
    return EncodedFrame(kind, data, (h, w, 3))


def decode(frame: EncodedFrame | np.ndarray) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        return frame
    if frame.kind == "raw":
        return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.shape)
    try:
        rgb = np.asarray(Image.open(io.BytesIO(frame.data)).convert("RGB"), dtype=np.uint8)
    except Exception:
        raise MalformedFrameError(f"{FORMATS[frame.kind]} image data is corrupt") from None
    if rgb.shape != frame.shape:
        raise MalformedFrameError(f"image decoded to {rgb.shape}, its header said {frame.shape}")
    return rgb


def decode_all(frames: list[EncodedFrame | np.ndarray], pool: Executor | None = None) -> list[np.ndarray]:
    """Decode a batch, on `pool`'s threads when given (arrays pass through unchanged)."""
    if pool is None or sum(isinstance(f, EncodedFrame) and f.kind != "raw" for f in frames) < 2:
        return [decode(f) for f in frames]
    return list(pool.map(decode, frames))


def _check_pixels(h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise InvalidInputError(f"frame of {w}x{h} exceeds {max_pixels} pixels")
