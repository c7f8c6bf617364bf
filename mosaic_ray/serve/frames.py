"""FrameParser: request bodies -> checked, still-compressed frames (`EncodedFrame`) with timestamps.

Two body kinds reach POST /v1/streams/{id}/frames:
- msgpack `{"seq": int, "frames": [{"ts", "jpeg" | "png" | "raw" + "shape"}]}` (`FrameBatchIn`);
- one image (`image/jpeg` or `image/png`), its `ts` and optional `seq` given as query parameters.

msgpack is decoded with limits, so a small hostile body cannot become a large Python object: byte
strings no longer than the body, other strings short, arrays no longer than a batch, maps no
wider than a frame's fields, no extension types, at most `MAX_CONTAINERS` maps and arrays, nested
at most `MAX_DEPTH` deep (a batch is map > frames array > frame map > shape array: 4).

The ingress checks everything it can without decoding pixels: the batch's schema, each image's
format and size from its header (so a decompression bomb is refused unread), the pixel limit, a raw
frame's byte count. What fails is a 4xx here, before any shard is involved. Pixels are decoded on
the shard (`mosaic_ray.runtime.durability.frame_codec` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from pydantic import ValidationError

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame, inspect
from mosaic_ray.serve.errors import MalformedBodyError
from mosaic_ray.serve.schemas import FrameBatchIn, FrameIn

MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
IMAGE_TYPES = {"image/jpeg": "jpeg", "image/png": "png"}


# Limits of a msgpack body. The deepest legal batch is 4 levels (see above); every string is a
# field name, so 64 characters is plenty; a frame has at most 5 fields (ts, one payload, shape).
MAX_DEPTH = 4
MAX_STR_LEN = 64
MAX_MAP_LEN = 8
MAX_ARRAY_LEN_FLOOR = 8  # a shape has 3 entries, whatever `max_frames` is


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its `$defs` inlined (OpenAPI resolves refs from its own root)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(dict(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


# The frames route reads its body itself (msgpack or an image): declared here for OpenAPI.
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    **{t: {"schema": _inline(FrameBatchIn.model_json_schema())} for t in sorted(MSGPACK_TYPES)[:1]},
    **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
}}}


@dataclass(slots=True)
class ParsedBatch:
    seq: int | None
    frames: list[EncodedFrame]
    timestamps: list[float]


class _TooBig(ValueError):
    pass


class FrameParser:
    def __init__(self, max_frames: int, max_pixels: int, max_body_bytes: int = 64 << 20) -> None:
        self.max_frames = max_frames
        self.max_pixels = max_pixels
        self.max_body_bytes = max_body_bytes
        # Maps and arrays of the largest legal batch: the top map, the frames array, and per
        # frame its map and a shape. More is not a frame batch, whatever its schema would say.
        self.max_containers = 2 + 2 * max_frames

    def parse_msgpack(self, body: bytes) -> ParsedBatch:
        raw = self.unpack(body)
        try:
            batch = FrameBatchIn.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidInputError(f"invalid frame batch at {where or 'body'}: {first.get('msg')}") from None
        if len(batch.frames) > self.max_frames:
            raise InvalidInputError(f"at most {self.max_frames} frames per batch, got {len(batch.frames)}")
        return ParsedBatch(batch.seq, [self._frame(f) for f in batch.frames], [f.ts for f in batch.frames])

    def unpack(self, body: bytes) -> object:
        """msgpack -> Python objects within this parser's limits; `MalformedBodyError` otherwise."""
        containers = 0

        def count(obj):  # called once per decoded map or array, innermost first
            nonlocal containers
            containers += 1
            if containers > self.max_containers:
                raise _TooBig(f"more than {self.max_containers} maps and arrays")
            return obj

        try:
            raw = msgpack.unpackb(
                body, raw=False, strict_map_key=True, use_list=True,
                max_bin_len=self.max_body_bytes, max_str_len=MAX_STR_LEN, max_ext_len=0,
                max_array_len=max(self.max_frames, MAX_ARRAY_LEN_FLOOR), max_map_len=MAX_MAP_LEN,
                list_hook=count, object_hook=count,
            )
        except _TooBig as exc:
            raise MalformedBodyError(f"msgpack body exceeds its limits: {exc}") from None
        except Exception as exc:
            # msgpack's own messages name the limit hit ("301 exceeds max_array_len(256)"), no data.
            raise MalformedBodyError(f"body is not valid msgpack within its limits: {type(exc).__name__}: "
                                     f"{str(exc)[:200]}") from None
        depth = _depth(raw)
        if depth > MAX_DEPTH:
            raise MalformedBodyError(f"msgpack body is nested {depth} deep; a frame batch is at most {MAX_DEPTH}")
        return raw

    def parse_image(self, body: bytes, content_type: str, ts: float, seq: int | None) -> ParsedBatch:
        return ParsedBatch(seq, [inspect(IMAGE_TYPES[content_type], body, self.max_pixels)], [ts])

    def _frame(self, f: FrameIn) -> EncodedFrame:
        for kind in ("jpeg", "png"):
            data = getattr(f, kind)
            if data is not None:
                return inspect(kind, data, self.max_pixels)
        return inspect("raw", f.raw, self.max_pixels, f.shape)


def _depth(obj: object) -> int:
    """Nesting depth of maps and arrays (a scalar is 0); iterative, so any depth is safe to measure."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        node, level = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        todo.extend((c, level + 1) for c in children)
    return deepest
