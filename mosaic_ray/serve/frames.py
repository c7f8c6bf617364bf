"""FrameParser: request bodies -> checked, still-compressed frames (`EncodedFrame`) with timestamps.

Two body kinds reach POST /v1/streams/{id}/frames:
- msgpack `{"seq": int, "frames": [{"ts", "jpeg" | "png" | "raw" + "shape"}]}` (`FrameBatchIn`);
- one image (`image/jpeg` or `image/png`), its `ts` and optional `seq` given as query parameters.

The ingress checks everything it can without decoding pixels: the batch's schema, each image's
format and size from its header (so a decompression bomb is refused unread), the pixel limit, a raw
frame's byte count. What fails is a 4xx here, before any shard is involved. Pixels are decoded on
the shard (`mosaic_ray.runtime.frame_codec` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from pydantic import ValidationError

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.frame_codec import EncodedFrame, inspect
from mosaic_ray.serve.errors import MalformedBodyError
from mosaic_ray.serve.schemas import FrameBatchIn, FrameIn

MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
IMAGE_TYPES = {"image/jpeg": "jpeg", "image/png": "png"}


@dataclass(slots=True)
class ParsedBatch:
    seq: int | None
    frames: list[EncodedFrame]
    timestamps: list[float]


class FrameParser:
    def __init__(self, max_frames: int, max_pixels: int) -> None:
        self.max_frames = max_frames
        self.max_pixels = max_pixels

    def parse_msgpack(self, body: bytes) -> ParsedBatch:
        try:
            raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as exc:
            raise MalformedBodyError(f"body is not valid msgpack: {type(exc).__name__}") from None
        try:
            batch = FrameBatchIn.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidInputError(f"invalid frame batch at {where or 'body'}: {first.get('msg')}") from None
        if len(batch.frames) > self.max_frames:
            raise InvalidInputError(f"at most {self.max_frames} frames per batch, got {len(batch.frames)}")
        return ParsedBatch(batch.seq, [self._frame(f) for f in batch.frames], [f.ts for f in batch.frames])

    def parse_image(self, body: bytes, content_type: str, ts: float, seq: int | None) -> ParsedBatch:
        return ParsedBatch(seq, [inspect(IMAGE_TYPES[content_type], body, self.max_pixels)], [ts])

    def _frame(self, f: FrameIn) -> EncodedFrame:
        for kind in ("jpeg", "png"):
            data = getattr(f, kind)
            if data is not None:
                return inspect(kind, data, self.max_pixels)
        return inspect("raw", f.raw, self.max_pixels, f.shape)
