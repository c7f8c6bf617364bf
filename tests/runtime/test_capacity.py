"""CapacityGate: a new stream is refused once the engine's measured busy share, scaled to one more
stream, would pass the limit; nothing is refused before there is something measured."""

from mosaic_ray.runtime.actors.capacity import CapacityGate


def test_admits_until_the_projection_passes_the_limit():
    g = CapacityGate(0.9, window_s=10)
    assert g.refusal(4) is None  # nothing measured yet
    g.observe(0.0, 0.0)
    g.observe(10.0, 6.0)  # busy 60 % with 4 streams: 5 would need 75 %
    assert abs(g.utilization() - 0.6) < 1e-9 and g.refusal(4) is None
    g.observe(20.0, 14.0)  # the window slides: 80 % over the last 10 s
    assert abs(g.utilization() - 0.8) < 1e-9
    why = g.refusal(4)  # 5 streams would need 100 %
    assert why is not None and "capacity" in why and g.retry_after_s() >= 1.0
    assert g.refusal(0) is None  # an empty shard takes its first stream


def test_no_limit_and_no_time_admit_everything():
    g = CapacityGate(None)
    g.observe(0.0, 0.0)
    g.observe(5.0, 5.0)
    assert g.refusal(1) is None
    h = CapacityGate(0.5)
    h.observe(1.0, 0.0)
    h.observe(1.0, 1.0)  # no wall time passed: not a measurement
    assert h.utilization() is None and h.refusal(3) is None


import asyncio  # noqa: E402

import pytest  # noqa: E402

from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime  # noqa: E402
from mosaic_ray.runtime.config import RuntimeConfig  # noqa: E402
from mosaic_ray.runtime.errors import ShardBusyError  # noqa: E402
from mosaic_ray.serve.directory import StreamDirectory  # noqa: E402
from tests.runtime.fake_engine import FACTORY  # noqa: E402


@pytest.mark.ray
def test_a_shard_at_capacity_refuses_and_the_router_places_elsewhere(ray_cluster):
    """Engines busy 60 % of the time: each shard takes one stream (an empty shard always does),
    a second would need 120 %: the router tries the other shard, then answers 503."""
    cfg = RuntimeConfig(name="capacity", num_shards=2,
                        engine={"factory": FACTORY, "kwargs": {"busy_share": 0.6}},
                        shard={"num_gpus": 1, "num_cpus": 0, "health_timeout_s": 5, "max_utilization": 0.9},
                        router={"health_interval_s": 0, "load_cache_s": 0})
    shutdown_runtime(cfg, forget_streams=True)
    asyncio.run(connect_runtime(cfg))
    try:
        async def go():
            d = await StreamDirectory.connect(cfg)
            await asyncio.sleep(0.2)  # some measured time
            first = await d.ask_router("create_stream", "c1")
            second = await d.ask_router("create_stream", "c2")
            with pytest.raises(ShardBusyError, match="capacity"):
                await d.ask_router("create_stream", "c3")
            return first["shard"], second["shard"]

        a, b = asyncio.run(go())
        assert {a, b} == set(cfg.shard_names)
    finally:
        shutdown_runtime(cfg, forget_streams=True)
