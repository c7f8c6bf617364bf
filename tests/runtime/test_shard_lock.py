"""The shard holds a stream's lock through an answer's start and prefill only, when its engine takes
appends during answers (`Engine.appends_during_answers`): frames sent while the answer decodes are
acknowledged before it ends. Without the capability the lock is held to the end, as before."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.directory import StreamDirectory
from tests.runtime.fake_engine import FACTORY

pytestmark = pytest.mark.ray


def _runtime(name: str, early: bool) -> RuntimeConfig:
    return RuntimeConfig(name=name, num_shards=1,
                         engine={"factory": FACTORY, "kwargs": {"token_delay_s": 0.05, "appends_during_answers": early}},
                         shard={"num_gpus": 1, "num_cpus": 0, "health_timeout_s": 5},
                         router={"health_interval_s": 0, "load_cache_s": 0})


@pytest.mark.parametrize("early", [True, False])
def test_frames_during_an_answer(ray_cluster, early):
    cfg = _runtime(f"lock-{int(early)}", early)
    shutdown_runtime(cfg, forget_streams=True)
    asyncio.run(connect_runtime(cfg))
    try:
        async def go():
            d = await StreamDirectory.connect(cfg)
            await d.ask_router("create_stream", "s", cfg.shard_names[0])
            await d.call("s", "append_frames", 0, [np.full((8, 8, 3), 7, np.uint8)] * 2, [0.0, 1.0])
            t0 = time.perf_counter()
            answer_done = []

            async def ask():
                text = "".join([x async for x in d.stream("s", "ask", {"question": "a b c d e f g h", "max_tokens": 12})])
                answer_done.append(time.perf_counter() - t0)
                return text

            asking = asyncio.ensure_future(ask())
            await asyncio.sleep(0.15)  # the answer is decoding (50 ms per word)
            ack = await d.call("s", "append_frames", 1, [np.full((8, 8, 3), 9, np.uint8)], [2.0])
            acked_at = time.perf_counter() - t0
            await asking
            return ack, acked_at, answer_done[0], await d.call("s", "stream_info")

        ack, acked_at, done_at, info = asyncio.run(go())
        assert ack["frames_added"] == 1 and info["frames"] == 3
        if early:
            assert acked_at < done_at  # not behind the answer
        else:
            assert acked_at >= done_at - 0.01
    finally:
        shutdown_runtime(cfg, forget_streams=True)
