"""CacheObserver (`cache/observer.py`): a cache tells its observer of every adopt, maintain and
retrieval, with what the cache was given and what it returned; replaying the adoptions it saw
rebuilds the same cache; no observer, no calls."""

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.cache.working_set import WorkingSet
from mosaic_ray.config import CacheConfig

SINK, WINDOW, BATCH = 2, 10, 8


class Log(CacheObserver):
    def __init__(self):
        self.calls = []

    def on_adopt(self, cache, slots, order, time, pos, block, text):
        k, v = cache.kv_pool.read(slots)
        self.calls.append(("adopt", cache, TokenBatch(k, v, order.clone(), time.clone(), pos.clone(), block.clone(),
                                                      None if text is None else text.clone())))

    def on_maintain(self, cache, max_work, offload):
        self.calls.append(("maintain", cache, max_work, offload))

    def on_retrieve(self, cache, layer, query, selection, since, until):
        self.calls.append(("retrieve", cache, layer, query, selection, since, until))


def _cache(layout, pool, method="token", observer=None):
    cfg = CacheConfig(retrieval=method, sink_tokens=SINK, window_tokens=WINDOW, budget_tokens=6, offload_batch=BATCH)
    return StreamCache(layout, cfg, pool, "cpu", DeviceKVPool(layout, "cpu", growable=True), observer)


@pytest.mark.parametrize("method", ["token", "cluster"])
def test_the_observer_sees_what_the_cache_did_and_its_log_replays_it(layout, pool, method):
    log = Log()
    cache = _cache(layout, pool, method, log)
    batches = [make_batch(layout, 0, 12, seed=1), make_batch(layout, 12, 9, seed=2)]
    for b in batches:
        cache.append(b)
    cache.maintain(3, offload=True)
    assert [c[0] for c in log.calls] == ["adopt", "adopt", "maintain"]
    assert all(c[1] is cache for c in log.calls)
    assert log.calls[2][2:] == (3, True)
    for (_, _, seen), b in zip(log.calls, batches):
        torch.testing.assert_close(seen.keys, b.keys)
        torch.testing.assert_close(seen.values, b.values)
        assert torch.equal(seen.order, b.order) and torch.equal(seen.time, b.time)
    replay = _cache(layout, pool, method)
    for call in log.calls:
        replay.append(call[2]) if call[0] == "adopt" else replay.maintain(call[2], call[3])
    assert (replay.past_tokens, replay.resident_tokens) == (cache.past_tokens, cache.resident_tokens)
    assert torch.equal(replay.order, cache.order)
    assert replay.retriever.past_tokens == cache.retriever.past_tokens > 0


def test_the_observer_sees_each_retrieval_with_its_selection(layout, pool):
    log = Log()
    cache = _cache(layout, pool, "token", log)
    cache.append(make_batch(layout, 0, 30, seed=3))
    cache.maintain()
    log.calls.clear()
    work = WorkingSet.reserve(cache.kv_pool, cache.retrieved_tokens(), 4)
    counts = torch.zeros(5, dtype=torch.int64)
    q = torch.randn(layout.num_kv_heads, layout.head_dim)
    sel = cache.retrieve_into(1, q, work, counts, 0.0, None)
    assert len(log.calls) == 1
    kind, seen, layer, query, selection, since, until = log.calls[0]
    assert (kind, seen, layer, since, until) == ("retrieve", cache, 1, 0.0, None)
    assert query is q and selection is sel


def test_no_observer_no_calls(layout, pool):
    cache = _cache(layout, pool)
    assert cache.observer is None
    cache.append(make_batch(layout, 0, 20, seed=4))
    cache.maintain()
    log = Log()
    cache.observer = log  # registered later: told from then on
    cache.maintain()
    assert [c[0] for c in log.calls] == ["maintain"]
