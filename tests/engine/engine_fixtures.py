"""Engine builders and random frames for the engine tests."""

import numpy as np

from mosaic_ray.config import CacheConfig, EngineConfig
from mosaic_ray.engine.stream_engine import StreamEngine


def make_engine(adapter, retrieval="full", window=4096, budget=None, sink=16, *, engine=None, **cache):
    """An engine on the adapter's device (its device pool sized for tests). Tokens leaving the
    window are offloaded in batches of 8 unless told otherwise: a question usually meets a past
    that is part offloaded (retrieved), part staged (attended in place). `engine`: more
    EngineConfig fields."""
    cache.setdefault("offload_batch", 8)
    cfg = EngineConfig(model="tiny", device=str(adapter.device), kv_pool={"capacity_tokens": 1 << 16}, **(engine or {}),
                       cache=CacheConfig(
        retrieval=retrieval, window_tokens=window, sink_tokens=sink, budget_tokens=budget,
        pool={"capacity_bytes": 16 << 20}, **cache))
    return StreamEngine(cfg, adapter=adapter)


def frames(n, seed=0, size=56):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def make_loop_engine(tiny_adapter, method="cluster", **scheduler):
    """A small engine (window 24, sink 4, budget 30) whose step loop runs the given
    SchedulerConfig fields."""
    e = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    if scheduler:
        from mosaic_ray.config import SchedulerConfig
        from mosaic_ray.engine.scheduler import StepScheduler

        e.loop.scheduler = StepScheduler(SchedulerConfig(**scheduler))
    return e
