"""StreamDurability (and the EngineGuard it calls through) on their own, no ShardActor: a stream a
local shard logged is rebuilt by a StreamDurability given only the fake engine, a ShardLog, a slot
map and a `serve` callable; what it refuses."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.engine.interface import StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import DurabilitySpec, EngineSpec
from mosaic_ray.runtime.actors.engine_guard import EngineGuard
from mosaic_ray.runtime.actors.engine_runner import EngineRunner
from mosaic_ray.runtime.actors.shard_durability import StreamDurability
from mosaic_ray.runtime.durability.shard_log import ShardLog
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import StreamSlot
from tests.runtime.fake_engine import FACTORY
from tests.runtime.shard_fixtures import STORE, forget_store, local_shard, stop_local

RUNTIME = "durability-unit"


def _durability(slots: dict, served: list, snapshot_every_frames: int = 0):
    runner = EngineRunner("unit")
    engine = runner.call_blocking(EngineSpec(factory=FACTORY).build)
    guard = EngineGuard("unit", engine, runner, ShardMeter(10.0, (0.1,)), 5.0)
    spec = DurabilitySpec(store=STORE, snapshot_every_frames=snapshot_every_frames)

    def serve(sid: str, last_seq: int) -> None:
        served.append((sid, last_seq))
        slots[sid] = StreamSlot(sid, 10.0, last_seq)

    dur = StreamDurability("unit", ShardLog(spec, RUNTIME, 1), spec, engine, guard.call, guard.append, slots,
                           serve, lambda: guard.fatal is not None, 5.0)
    return dur, runner, engine, guard


def test_a_logged_stream_is_rebuilt_and_served_and_a_served_or_unlogged_one_is_refused():
    forget_store(RUNTIME)

    async def go():
        shard = local_shard(RUNTIME)
        await shard.open_stream("cam")
        for seq in range(3):
            await shard.append_frames("cam", seq, [np.full((8, 8, 3), seq, np.uint8)], [float(seq)])
        await shard.append_text("cam", "a note", 3.5)
        stop_local(shard)

        slots: dict[str, StreamSlot] = {}
        served: list = []
        dur, runner, engine, guard = _durability(slots, served)
        try:
            info = await dur.rebuild("cam")
            assert served == [("cam", 2)] and "cam" in slots
            assert info["frames"] == 3 and info["texts"] == 1 and info["shard"] == "unit"
            assert (await guard.call(engine.stream_info, "cam"))["frames"] == 3
            with pytest.raises(StreamExistsError):
                await dur.rebuild("cam")
            with pytest.raises(UnknownStreamError, match="has no frame log"):
                await dur.rebuild("never-logged")
            assert dur.stats() == {"enabled": False}  # no cadence: no snapshots
            with pytest.raises(UnknownStreamError, match="snapshots are off"):
                await dur.snapshot(slots["cam"])
            await dur.closed("cam")
            assert not await dur.log.exists("cam")
        finally:
            runner.close()

    asyncio.run(go())
    forget_store(RUNTIME)


def test_with_a_cadence_snapshots_are_on_and_counted():
    forget_store(RUNTIME)

    async def go():
        dur, runner, _, _ = _durability({}, [], snapshot_every_frames=4)
        try:
            stats = dur.stats()
            assert stats["enabled"] and stats["every_frames"] == 4 and stats["taken"] == 0
        finally:
            runner.close()

    asyncio.run(go())
    forget_store(RUNTIME)
