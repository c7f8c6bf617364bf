"""MigrationEndpoint on its own, no ShardActor: a move between two endpoints over the object-store
transport (Ray's object store stood in for by this process: `ray.put` / `ray.get` are identity),
and what an endpoint refuses or ignores."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray

from mosaic_ray.engine.interface import StreamExistsError
from mosaic_ray.runtime.config import EngineSpec, MigrationSpec
from mosaic_ray.runtime.actors.engine_guard import EngineGuard
from mosaic_ray.runtime.actors.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import MigrationError
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.shard_migration import MigrationEndpoint
from mosaic_ray.runtime.actors.stream_slot import StreamSlot
from tests.runtime.fake_engine import FACTORY


class _Side:
    """One shard's parts: an engine behind its guard, a slot map, the redirects it remembers."""

    def __init__(self, name: str) -> None:
        self.runner = EngineRunner(name)
        self.engine = self.runner.call_blocking(EngineSpec(factory=FACTORY).build)
        self.meter = ShardMeter(10.0, (0.1,))
        self.guard = EngineGuard(name, self.engine, self.runner, self.meter, 5.0)
        self.slots: dict[str, StreamSlot] = {}
        self.redirects: dict[str, str] = {}

        def lookup(sid: str) -> StreamSlot:
            return self.slots[sid]

        def serve(sid: str, last_seq: int, rates) -> None:
            self.slots[sid] = StreamSlot(sid, 10.0, last_seq, rates)

        self.endpoint = MigrationEndpoint(name, MigrationSpec(rendezvous_host="127.0.0.1"), self.engine,
                                          self.guard.call, self.slots, lookup, serve, self.redirects.__setitem__,
                                          None, self.meter)


def test_a_stream_moves_between_two_endpoints_and_the_source_redirects(monkeypatch):
    monkeypatch.setattr(ray, "put", lambda value: value)
    monkeypatch.setattr(ray, "get", lambda ref: ref)

    async def go():
        src, dst = _Side("src"), _Side("dst")
        try:
            await src.guard.call(src.engine.open_stream, "cam")
            await src.guard.call(src.engine.append_frames, "cam", [np.full((8, 8, 3), 7, np.uint8)], [0.0])
            src.slots["cam"] = StreamSlot("cam", 10.0, 4)
            phases = await src.endpoint.begin("cam")
            assert src.slots["cam"].frozen and "export_s" in phases
            offer = await src.endpoint.offer("cam", "object_store")
            await dst.endpoint.receive(offer)
            assert dst.slots["cam"].last_seq == 4 and dst.meter.migrations_in == 1
            assert (await dst.guard.call(dst.engine.stream_info, "cam"))["frames"] == 1
            with pytest.raises(StreamExistsError):
                await dst.endpoint.receive(offer)
            await src.endpoint.finish("cam", "dst")
            assert "cam" not in src.slots and src.redirects == {"cam": "dst"} and src.meter.migrations_out == 1
            assert not await src.guard.call(src.engine.has_stream, "cam")
        finally:
            src.runner.close()
            dst.runner.close()

    asyncio.run(go())


def test_an_aborted_move_serves_the_stream_again_and_unknown_moves_are_refused_or_ignored():
    async def go():
        side = _Side("one")
        try:
            await side.guard.call(side.engine.open_stream, "cam")
            side.slots["cam"] = StreamSlot("cam", 10.0)
            await side.endpoint.begin("cam")
            assert await side.endpoint.abort_all() == ["cam"] and not side.slots["cam"].frozen
            with pytest.raises(MigrationError, match="not being moved"):
                await side.endpoint.offer("cam", "object_store")
            await side.endpoint.finish("elsewhere", "two")  # not here: nothing to do
            assert side.redirects == {} and await side.endpoint.abort_all() == []
        finally:
            side.runner.close()

    asyncio.run(go())
