"""The fake engine keeps the interface's promises the runtime tests rely on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.engine.interface import AskRequest, InvalidInputError, StreamExistsError, UnknownStreamError
from tests.runtime.fake_engine import FakeEngine


def _frames(n: int, value: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), value + i, np.uint8) for i in range(n)]


def _ask(engine: FakeEngine, sid: str, q: str = "what happened?") -> str:
    async def run() -> str:
        return "".join([d async for d in engine.ask(sid, AskRequest(q))])

    return asyncio.run(run())


def test_answers_depend_on_own_stream_only_and_survive_export_import():
    a, b = FakeEngine(), FakeEngine()
    for sid, v in (("x", 10), ("y", 200)):
        a.open_stream(sid)
        a.append_frames(sid, _frames(3, v), [0.0, 1.0, 2.0])
    ans_x = _ask(a, "x")
    a.append_frames("y", _frames(2, 50), [3.0, 4.0])  # another stream changes
    state = a.export_stream("x")
    b.import_stream("x", state)
    assert _ask(a, "x") == _ask(b, "x")  # same history (one Q/A turn) on both sides
    assert _ask(a, "x") != ans_x  # the Q/A turns joined the context


def test_invalid_calls_raise_and_change_nothing():
    e = FakeEngine()
    e.open_stream("x")
    with pytest.raises(StreamExistsError):
        e.open_stream("x")
    with pytest.raises(UnknownStreamError):
        e.append_frames("nope", _frames(1, 0), [0.0])
    e.append_frames("x", _frames(1, 0), [5.0])
    with pytest.raises(InvalidInputError):
        e.append_frames("x", _frames(2, 0), [6.0, 4.0])
    assert e.stream_info("x")["frames"] == 1
