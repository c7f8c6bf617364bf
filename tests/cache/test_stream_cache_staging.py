"""StreamCache staging: tokens leaving the window wait in the device pool, attended in place, until
`offload_batch` of them go to the retriever in one insert (off the ingest path)."""

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig, PoolConfig

SINK, WINDOW, BATCH = 2, 10, 16
METHODS = ["frame", "token", "cluster"]


def _cache(layout, pool, method, budget=10_000, offload_batch=BATCH):
    kv = DeviceKVPool(layout, "cpu", growable=True)
    cfg = CacheConfig(retrieval=method, sink_tokens=SINK, window_tokens=WINDOW, budget_tokens=budget,
                      offload_batch=offload_batch, cluster=ClusterConfig(split_size=16, max_size=32))
    return StreamCache(layout, cfg, pool, "cpu", kv), kv


def _attend(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, -1)
    return w @ v


@pytest.mark.parametrize("method", METHODS)
def test_leaving_tokens_wait_until_a_batch_gathers(layout, pool, method):
    cache, kv = _cache(layout, pool, method)
    cache.append(make_batch(layout, 0, 20, seed=1))  # 8 leave the window
    assert (cache.staged_tokens, cache.retriever.past_tokens, cache.past_tokens) == (8, 0, 8)
    assert cache.maintain() == 0  # fewer than offload_batch: nothing to do yet
    assert cache.retrieved_tokens() == 0 and cache.past_slots().numel() == 8
    cache.append(make_batch(layout, 20, 10, seed=2))  # 18 staged now
    used = kv.used_slots
    assert cache.maintain() >= 1  # one offload of all 18
    assert (cache.staged_tokens, cache.retriever.past_tokens, cache.past_tokens) == (0, 18, 18)
    assert kv.used_slots == used - 18  # their slots went back to the device pool
    assert cache.past_slots() is None and cache.retrieved_tokens() == 18


@pytest.mark.parametrize("method", METHODS)
def test_staged_plus_retrieved_is_the_whole_past(layout, pool, method):
    """With a budget >= the past, window + staged (in place) + retrieved is exactly every token."""
    cache, kv = _cache(layout, pool, method)
    batches = [make_batch(layout, i * 13, 13, seed=i) for i in range(5)]
    for b in batches:
        cache.append(b)
        cache.maintain()
    cache.append(extra := make_batch(layout, 65, 9, seed=9))  # leaves some staged, some offloaded
    batches.append(extra)
    assert cache.staged_tokens > 0 and cache.retriever.past_tokens > 0
    keys = torch.cat([b.keys for b in batches], 1)
    values = torch.cat([b.values for b in batches], 1)
    H = layout.num_kv_heads
    for layer in range(layout.num_layers):
        q = torch.randn(H, layout.head_dim)
        got = cache.retrieve(layer, q)
        assert int(got.valid.sum()) == H * cache.retrieved_tokens()
        k_res, v_res, _ = cache.resident(layer)
        k_st, v_st = kv.read_layer(layer, cache.past_slots())
        k = torch.cat([k_res, k_st, got.keys], 1)
        v = torch.cat([v_res, v_st, got.values], 1)
        g = slice(layer * H, (layer + 1) * H)
        torch.testing.assert_close(_attend(q[:, None], k, v), _attend(q[:, None], keys[g], values[g]))


def test_no_offload_while_a_question_holds(layout, pool):
    cache, kv = _cache(layout, pool, "cluster")
    cache.append(make_batch(layout, 0, 30, seed=1))  # 18 staged
    staged = cache.past_slots().clone()
    k_before, _ = kv.read(staged)
    cache.hold()
    assert cache.maintain() == 0 and cache.staged_tokens == 18
    with pytest.raises(RuntimeError, match="holds"):
        cache.offload()
    cache.append(make_batch(layout, 30, 100, seed=2))  # far past the inline bound: still staged
    assert cache.staged_tokens == 118 and torch.equal(kv.read(staged)[0], k_before)
    cache.unhold()
    assert cache.maintain() >= 1 and cache.staged_tokens == 0 and cache.retriever.past_tokens == 118


def test_a_stream_that_falls_behind_offloads_inline(layout, pool):
    cache, _ = _cache(layout, pool, "token")
    cache.append(make_batch(layout, 0, WINDOW + SINK + 4 * BATCH, seed=1))  # 64 staged, never maintained
    assert cache.staged_tokens == 4 * BATCH
    cache.append(make_batch(layout, 76, 3, seed=2))  # the bound is hit: the 64 go first, then 3 are staged
    assert (cache.retriever.past_tokens, cache.staged_tokens) == (4 * BATCH, 3)


def test_a_refused_offload_keeps_everything_staged(layout):
    pool = HostPool(layout, PoolConfig(capacity_bytes=1 << 14, slab_tokens=8))  # a few slabs only
    cache, kv = _cache(layout, pool, "token")
    cache.append(make_batch(layout, 0, 200, seed=1))
    before = (cache.staged_tokens, cache.past_slots().clone(), kv.used_slots)
    with pytest.raises(PoolExhaustedError):
        cache.offload()
    assert cache.staged_tokens == before[0] and torch.equal(cache.past_slots(), before[1])
    assert kv.used_slots == before[2] and cache.retriever.past_tokens == 0
    cache.release()
    assert kv.used_slots == 0


def test_time_range_filters_staged_tokens(layout, pool):
    cache, _ = _cache(layout, pool, "cluster")
    cache.append(make_batch(layout, 0, 40, seed=1))  # tokens 2..29 staged, timestamps 0.1 x order
    inside = cache.past_slots(since=1.0, until=2.0)
    assert inside.numel() == 11  # orders 10..20


def test_offload_batch_one_offloads_at_once(layout, pool):
    cache, _ = _cache(layout, pool, "cluster", offload_batch=1)
    cache.append(make_batch(layout, 0, 20, seed=1))
    assert cache.staged_tokens == 0 and cache.retriever.past_tokens == 8


def test_offload_of_a_part_batch_and_release(layout, pool):
    cache, kv = _cache(layout, pool, "frame")
    cache.append(make_batch(layout, 0, 20, seed=1))
    cache.offload()
    assert cache.staged_tokens == 0 and cache.retriever.past_tokens == 8
    cache.append(make_batch(layout, 20, 5, seed=2))
    assert cache.staged_tokens == 5
    cache.release()
    assert kv.used_slots == 0 and pool.free_slabs == pool.num_slabs
