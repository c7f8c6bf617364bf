"""When the torch.distributed group cannot form in time, `auto` moves the stream through Ray's
object store instead, and the stream arrives whole."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.directory import StreamDirectory
from tests.runtime.fake_engine import FACTORY

pytestmark = pytest.mark.ray


def test_auto_falls_back_to_the_object_store(ray_cluster):
    cfg = RuntimeConfig(
        name="rt-fallback",
        num_shards=2,
        engine={"factory": FACTORY},
        shard={"num_gpus": 1, "num_cpus": 0},
        router={"health_interval_s": 0},
        # The rendezvous address is unroutable (TEST-NET-1) and the deadline a millisecond: the
        # distributed path fails every time (a millisecond alone sometimes sufficed on loopback).
        migration={"transport": "auto", "timeout_s": 0.001, "rendezvous_host": "192.0.2.1"},
    )
    a, b = cfg.shard_names
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(4)]

    async def go():
        d = await StreamDirectory.connect(cfg)
        await d.ask_router("create_stream", "fb", a)
        await d.call("fb", "append_frames", 0, frames, [0.0, 1.0, 2.0, 3.0])
        moved = await d.ask_router("migrate", "fb", b)
        return moved, await d.call("fb", "stream_info")

    try:
        asyncio.run(connect_runtime(cfg))
        moved, info = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert moved["transport"] == "object_store"
    assert info["shard"] == b and info["frames"] == 4 and info["last_seq"] == 0
