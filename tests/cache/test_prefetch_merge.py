"""Prefetched rows merge bit-exactly with rows read on demand; only misses touch the host."""

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.gather import Prefetched, gather, merge_prefetched
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig


@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
@pytest.mark.parametrize("guess", ["same", "other", "none"])
def test_fetch_with_prefetch_equals_plain_fetch(layout, pool, method, guess):
    cache = StreamCache(layout, CacheConfig(retrieval=method, offload_batch=1, budget_tokens=30, window_tokens=16, sink_tokens=2,
                                            cluster=ClusterConfig(split_size=16, max_size=32)), pool, "cpu")
    for i in range(8):
        cache.append(make_batch(layout, i * 25, 25, seed=i))
    q = torch.randn(layout.num_kv_heads, layout.head_dim)
    sel = cache.select(1, q)
    plain = cache.retriever.fetch(sel)
    q_guess = {"same": q, "other": torch.randn_like(q), "none": None}[guess]
    if q_guess is None:
        rows = torch.full_like(sel.rows, -1)
    else:
        rows = cache.select(1, q_guess).rows
    pre = Prefetched(rows, gather(pool, rows, torch.device("cpu"), cache.retriever.host_parts))
    merged = cache.retriever.fetch(sel, prefetched=pre)
    for name in ("keys", "values", "order", "pos", "valid"):
        assert torch.equal(getattr(plain, name), getattr(merged, name)), name
    selected = int((sel.rows >= 0).sum())
    if guess == "same":
        assert merged.misses == 0 and merged.bytes_moved == 0
    if guess == "none":
        assert merged.misses == selected


def test_merge_reports_misses(layout, pool):
    owner = pool.register_owner()
    slabs = pool.allocate(2, owner)
    rows = torch.stack([slabs * pool.slab_tokens, slabs * pool.slab_tokens + 1])
    n, D = rows.numel(), layout.head_dim  # known contents (a fresh slab holds whatever memory held: NaN too)
    pool.write(rows.flatten(), torch.randn(n, D), torch.randn(n, D), torch.arange(n), torch.zeros(n),
               torch.zeros(n, layout.pos_dims, dtype=torch.int32))
    pre = Prefetched(rows[:, :1], gather(pool, rows[:, :1], torch.device("cpu"), "kv"))
    data, misses = merge_prefetched(pool, rows, torch.device("cpu"), "kv", pre)
    assert torch.equal(misses[:, 0], torch.tensor([-1, -1])) and bool((misses[:, 1] >= 0).all())
    assert torch.equal(data["k"], gather(pool, rows, torch.device("cpu"), "kv")["k"])
