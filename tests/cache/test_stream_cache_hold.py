"""StreamCache.hold: slots a question attends keep their K/V while frames push them out of the window."""

import pytest

from cache_fixtures import make_batch
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig


@pytest.mark.parametrize("method", ["token", "cluster", "full"])
def test_held_slots_keep_their_kv_until_unhold(layout, pool, method):
    kv = DeviceKVPool(layout, "cpu", growable=True)
    cfg = CacheConfig(retrieval=method, sink_tokens=2, window_tokens=6, budget_tokens=8, offload_batch=1)
    cache = StreamCache(layout, cfg, pool, "cpu", kv)
    cache.append(make_batch(layout, 0, 8, seed=1))
    attended = cache.slots.clone()
    k_before, v_before = kv.read(attended)
    cache.hold()
    free_before = kv.free_slots
    cache.append(make_batch(layout, 8, 5, seed=2))  # 5 tokens leave the window
    assert kv.free_slots == free_before - 5  # their slots stay allocated (or owned by `full`'s past)
    k_now, v_now = kv.read(attended)
    assert k_now.equal(k_before) and v_now.equal(v_before)
    cache.unhold()
    assert kv.free_slots == (free_before if method != "full" else free_before - 5)
    with pytest.raises(RuntimeError, match="without a hold"):
        cache.unhold()


def test_release_frees_held_slots(layout, pool):
    kv = DeviceKVPool(layout, "cpu", growable=True)
    cache = StreamCache(layout, CacheConfig(retrieval="token", sink_tokens=2, window_tokens=6, budget_tokens=8, offload_batch=1), pool, "cpu", kv)
    total = kv.free_slots
    cache.append(make_batch(layout, 0, 8, seed=1))
    cache.hold()
    cache.append(make_batch(layout, 8, 5, seed=2))
    cache.release()
    assert kv.free_slots == total
