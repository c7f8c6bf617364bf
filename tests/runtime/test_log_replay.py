"""Replaying a frame log into an engine (no Ray): the engine ends up as ingest left it. Duplicates
and records the engine refused are skipped, text and options keep their place, frame records are
applied in groups, and a corrupt image fails only its own record."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from PIL import Image

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame, decode_all, inspect
from mosaic_ray.runtime.durability.frame_log import FrameRecord, OpenRecord, OptionsRecord, TextRecord
from mosaic_ray.runtime.durability.log_replay import replay
from tests.runtime.fake_engine import FakeEngine

MAX_FRAMES = 4


def _jpeg(value: int) -> EncodedFrame:
    out = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(out, format="JPEG")
    return inspect("jpeg", out.getvalue(), 1 << 20)


def _rec(seq: int, ts: list[float]) -> FrameRecord:
    return FrameRecord(seq, tuple(_jpeg(10 * seq + i) for i in range(len(ts))), tuple(ts))


def _run(records, engine: FakeEngine, sid: str = "s"):
    calls = []

    async def append_frames(frames, stamps):
        calls.append(len(frames))
        return engine.append_frames(sid, frames, stamps)

    async def append_text(text, ts):
        engine.append_text(sid, text, ts)

    async def configure(options):
        if options.get("bad"):
            raise InvalidInputError("no such option")
        return {}

    async def decode(frames):
        return decode_all(frames)

    engine.open_stream(sid)
    return asyncio.run(replay(records, append_frames, append_text, decode, MAX_FRAMES, configure)), calls


def test_replay_rebuilds_what_ingest_acknowledged():
    log = [
        OpenRecord(0.0),
        _rec(0, [0.0, 1.0]),
        _rec(1, [2.0, 3.0]),
        _rec(1, [2.0, 3.0]),  # a duplicate (a retried batch logged twice): skipped
        TextRecord("a note", 3.5),
        OptionsRecord({"bad": True}),  # refused when set, refused again
        _rec(2, [1.0]),  # timestamps going back: the engine refused it at ingest, and again now
        _rec(3, [4.0, 5.0, 6.0]),
        TextRecord("", 7.0),  # refused: empty text
        _rec(4, [7.0]),
        FrameRecord(5, (EncodedFrame("jpeg", b"\xff\xd8garbage", (16, 16, 3)),), (8.0,)),  # corrupt image
        _rec(6, [9.0]),
    ]
    engine = FakeEngine()
    done, calls = _run(log, engine)
    live = FakeEngine()  # what ingest left: the accepted batches, in order
    live.open_stream("s")
    for rec in (log[1], log[2]):
        live.append_frames("s", decode_all(list(rec.frames)), list(rec.timestamps))
    live.append_text("s", "a note", 3.5)
    for rec in (log[7], log[9], log[11]):
        live.append_frames("s", decode_all(list(rec.frames)), list(rec.timestamps))
    assert engine.stream_info("s") == live.stream_info("s")
    assert engine.export_stream("s")["meta"] == live.export_stream("s")["meta"]
    assert (done.last_seq, done.frames, done.texts, done.options) == (6, 9, 1, 0)
    assert done.skipped == 5
    assert max(calls) <= MAX_FRAMES and calls[0] == 4  # seq 0 and 1 in one call


def test_replay_of_an_empty_log_leaves_an_empty_stream():
    engine = FakeEngine()
    done, calls = _run([OpenRecord(0.0)], engine)
    assert done.last_seq == -1 and calls == [] and engine.stream_info("s")["frames"] == 0


def test_a_broken_engine_ends_the_replay():
    """`EngineFailedError` is an EngineError, but it means the engine broke: never skipped."""
    import pytest

    from mosaic_ray.runtime.errors import EngineFailedError

    async def broken(*_):
        raise EngineFailedError("engine failed: RuntimeError")

    async def decode(frames):
        return decode_all(frames)

    for log in ([TextRecord("x", 0.0)], [_rec(0, [0.0])], [_rec(0, [0.0]), _rec(1, [1.0])]):
        with pytest.raises(EngineFailedError):
            asyncio.run(replay(log, broken, broken, decode, MAX_FRAMES, broken))


def test_an_engine_out_of_room_ends_the_replay_without_skipping_a_record():
    """`OverloadedError` is capacity (a full host or device pool): the acknowledged record must
    not be skipped (it would be lost) nor the stream quarantined; the replay ends, for a retry."""
    import pytest

    from mosaic_ray.engine.interface import OverloadedError

    engine = FakeEngine()
    engine.open_stream("s")
    taken = []

    async def append_frames(frames, stamps):
        if len(taken) == 1:
            raise OverloadedError("host pool full")
        taken.append(len(frames))
        return engine.append_frames("s", frames, stamps)

    async def append_text(text, ts):
        raise OverloadedError("host pool full")

    async def decode(frames):
        return decode_all(frames)

    log = [_rec(0, [0.0, 1.0, 2.0]), _rec(1, [3.0, 4.0]), _rec(2, [5.0])]  # the 2nd group is refused
    with pytest.raises(OverloadedError):
        asyncio.run(replay(log, append_frames, append_text, decode, MAX_FRAMES))
    assert taken == [3]
    with pytest.raises(OverloadedError):
        asyncio.run(replay([TextRecord("x", 9.0)], append_frames, append_text, decode, MAX_FRAMES))
