"""The sync-free prefix selection (`prefix_positions`) gives the rows of the host-synced one
(`select_units` + `pack_in_order`), and a question's `retrieve_into` the tokens of `retrieve`."""

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.selection import NEG_INF, greedy_fill, pack_in_order, prefix_positions, select_units
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.working_set import WorkingSet
from mosaic_ray.config import CacheConfig, ClusterConfig

MAX_SIZE = 9  # members per unit at most
# (heads, units, budget)
CASES = [(1, 1, 1), (3, 17, 20), (4, 50, 7), (2, 40, 400), (4, 33, 64)]


def _rows_old(scores, sizes, budget, fill="prefix"):
    h, c = select_units(scores, sizes, budget, fill)
    j = torch.arange(MAX_SIZE)
    rows = torch.where(j[None] < sizes[h, c][:, None], c[:, None] * 1000 + j[None], -1)
    return pack_in_order(h, rows, scores.shape[0], budget)


@pytest.mark.parametrize("fill", ["prefix", "skip"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_positions_equal_select_then_pack(case, seed, fill):
    H, C, budget = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (H, C), generator=g).float()  # ties on purpose
    scores[torch.rand(H, C, generator=g) < 0.2] = NEG_INF  # out of range / empty units
    sizes = torch.randint(1, MAX_SIZE + 1, (H, C), generator=g)
    unit, member, valid = prefix_positions(scores, sizes, budget, fill)
    new = torch.where(valid, unit * 1000 + member, -1)
    assert torch.equal(new, _rows_old(scores, sizes, budget, fill))


def _greedy_reference(z, budget):
    """Walk best-first; take a unit when it fits in what is left (one head at a time, in Python)."""
    out = torch.zeros_like(z)
    for h in range(z.shape[0]):
        left = budget
        for c in range(z.shape[1]):
            if 0 < int(z[h, c]) <= left:
                out[h, c], left = z[h, c], left - int(z[h, c])
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [1, 5, 23, 60])
def test_greedy_fill_is_skip_and_continue(seed, budget):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 12, (3, 40), generator=g)
    got = greedy_fill(z, budget, rounds=64)
    assert torch.equal(got, _greedy_reference(z, budget))
    assert bool((got.sum(1) <= budget).all())
    # fewer rounds: never over budget, never a unit the greedy walk skips, at least the prefix
    few = greedy_fill(z, budget, rounds=2)
    assert bool((few.sum(1) <= budget).all()) and bool(((few == 0) | (few == got)).all())
    prefix = z * (torch.cumsum(z, 1) <= budget)
    assert bool((few.sum(1) >= prefix.sum(1)).all())


def test_skip_fills_the_budget_a_large_first_unit_would_block():
    """A 128-token cluster scored best and a budget of 115: the prefix takes nothing, skip the rest."""
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    sizes = torch.tensor([[128, 40, 60, 30]])
    assert select_units(scores, sizes, 115)[1].numel() == 0
    assert sorted(select_units(scores, sizes, 115, "skip")[1].tolist()) == [1, 2]


@pytest.mark.parametrize("scoring,fill", [("mean", "prefix"), ("max", "skip")])
@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
def test_retrieve_into_writes_the_tokens_retrieve_returns(layout, pool, method, scoring, fill):
    cfg = CacheConfig(retrieval=method, offload_batch=1, budget_tokens=37, sink_tokens=4, window_tokens=24,
                      cluster=ClusterConfig(split_size=16, max_size=32), scoring=scoring, fill=fill)
    kv = DeviceKVPool(layout, "cpu", growable=True)
    cache = StreamCache(layout, cfg, pool, "cpu", kv)
    for i in range(8):
        cache.append(make_batch(layout, i * 29, 29, seed=i))
    B = min(cache.budget(), cache.past_tokens)
    work = WorkingSet.reserve(kv, B, 4)
    for layer in range(layout.num_layers):
        q = cache.query_for(layer, torch.randn(3, 2 * layout.num_kv_heads, layout.head_dim), 0.25)
        want = cache.retrieve(layer, q)
        counts = torch.zeros(5, dtype=torch.int64)
        cache.retrieve_into(layer, q, work, counts)
        for h in range(layout.num_kv_heads):
            ok = kv.valid[layer, work.retrieved, h]
            got = {tuple(r.tolist()) for r in kv.k[layer, work.retrieved[ok], h]}
            exp = {tuple(r.tolist()) for r in want.keys[h][want.valid[h]]}
            assert got == exp and len(got) > 0
        assert int(counts[0]) == int(want.valid.sum())
