"""Frames checked in the ingress (header only) and decoded on the shard."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.errors import MalformedFrameError
from mosaic_ray.runtime.durability.frame_codec import decode, decode_all, inspect

RGB = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def _encode(fmt: str, rgb: np.ndarray = RGB) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt)
    return out.getvalue()


def test_png_and_raw_round_trip_exactly_and_jpeg_closely():
    assert np.array_equal(decode(inspect("png", _encode("PNG"), 10**6)), RGB)
    assert np.array_equal(decode(inspect("raw", RGB.tobytes(), 10**6, [48, 64, 3])), RGB)
    jpeg = decode(inspect("jpeg", _encode("JPEG"), 10**6))
    assert jpeg.shape == RGB.shape and jpeg.dtype == np.uint8


def test_limits_are_checked_from_the_header_before_any_pixel_is_decoded():
    with pytest.raises(InvalidInputError, match="exceeds"):
        inspect("png", _encode("PNG"), max_pixels=48 * 64 - 1)
    with pytest.raises(InvalidInputError, match="expected a JPEG"):
        inspect("jpeg", _encode("PNG"), 10**6)
    with pytest.raises(MalformedFrameError):
        inspect("jpeg", b"\xff\xd8 not really", 10**6)
    with pytest.raises(InvalidInputError, match="needs"):
        inspect("raw", b"\x00" * 10, 10**6, [48, 64, 3])


def test_corrupt_data_past_a_valid_header_fails_on_decode():
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    frame = inspect("jpeg", _encode("JPEG", noise)[:2000], 10**6)
    with pytest.raises(MalformedFrameError):
        decode(frame)


def test_parallel_decoding_equals_sequential():
    frames = [inspect("png", _encode("PNG", np.roll(RGB, i, axis=0)), 10**6) for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        parallel = decode_all(frames, pool)
    assert all(np.array_equal(a, b) for a, b in zip(parallel, decode_all(frames)))
