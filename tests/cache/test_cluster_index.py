"""Invariants of the cluster index under random sequences of inserts and splits."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_fixtures import make_batch
from mosaic_ray.cache.cluster_index import ClusterIndex
from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.cache.seeding import seed_unassigned
from mosaic_ray.cache.splitter import drain_splits
from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import ClusterConfig, KVLayout, PoolConfig

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _index(layout, pool, **cfg):
    config = ClusterConfig(**{"split_size": 16, "max_size": 32, **cfg})
    return ClusterIndex(layout, config, pool, pool.register_owner())


def _members(index, g, c):
    rows, valid = index.member_rows(torch.tensor([g]), torch.tensor([c]))
    return index.pool.read(rows[valid])


def _check_invariants(index, batches, drained):
    keys = torch.cat([b.keys for b in batches], 1)
    values = torch.cat([b.values for b in batches], 1)
    total = keys.shape[1]
    tau, var = index.thresholds(), index.variances()
    text = index.text_mask()
    for g in range(index.layout.groups):
        seen = []
        for c in range(int(index.num_clusters[g])):
            k, v, order, time, pos = _members(index, g, c)
            assert k.shape[0] == int(index.count[g, c]) <= index.config.max_size
            if k.shape[0] == 0:
                continue
            # pool content is bit-exact with what was inserted
            assert torch.equal(k, keys[g, order]) and torch.equal(v, values[g, order])
            # centroid is the mean of the members; time span covers them
            torch.testing.assert_close(index.centroid[g, c], k.float().mean(0), atol=1e-4, rtol=1e-4)
            if index.bounded:  # key bounds are the members' per-dimension min and max, exactly
                assert torch.equal(index.kmin[g, c], k.float().amin(0)) and torch.equal(index.kmax[g, c], k.float().amax(0))
            assert float(index.t_min[g, c]) == float(time.min()) and float(index.t_max[g, c]) == float(time.max())
            assert bool((order[1:] > order[:-1]).all()), "members are kept in time order"
            if drained and not bool(text[g, c]):  # a text segment's unit is never split
                assert int(index.count[g, c]) <= index.config.split_size
                assert float(var[g, c]) <= float(tau[g]) * (1 + 1e-4) + 1e-5
            seen.append(order)
        # every inserted token is in exactly one cluster of its group
        assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(total))


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    spread=st.sampled_from([0.0, 0.1, 1.0, 5.0]),
    drain_each=st.booleans(),
    ratio=st.sampled_from([0.05, 0.15, 0.5]),
    seed_chunk=st.sampled_from([0, 3, 16]),
    text_every=st.sampled_from([0, 2, 3]),
    representative=st.sampled_from(["centroid", "bound"]),
)
def test_invariants_after_any_inserts_and_splits(layout, pool, sizes, spread, drain_each, ratio, seed_chunk,
                                                 text_every, representative):
    index = _index(layout, pool, variance_ratio=ratio, seed_chunk=seed_chunk, representative=representative)
    batches, start = [], 0
    for i, n in enumerate(sizes):
        batch = make_batch(layout, start, n, seed=i, spread=spread)
        if text_every:  # every text_every-th block is a text segment
            batch.text = batch.block % text_every == 0
        start += n
        index.insert(batch)
        batches.append(batch)
        _check_invariants(index, batches, drained=False)
        if drain_each:
            drain_splits(index, 3)
    while drain_splits(index):
        pass
    _check_invariants(index, batches, drained=True)
    index.release()
    assert pool.free_slabs == pool.num_slabs


def test_clusters_follow_structure(layout, pool):
    """Keys around 6 centres with small noise: far fewer clusters than tokens, cohesive ones."""
    index = _index(layout, pool, split_size=64, max_size=128)
    for i in range(8):
        index.insert(make_batch(layout, i * 50, 50, seed=i, spread=0.05))
    while drain_splits(index):
        pass
    per_group = index.num_clusters.float().mean().item()
    assert 6 <= per_group <= 20, per_group


def _seed_problem(layout, n, seed):
    batch = make_batch(layout, 0, n, seed=seed, spread=1.0)
    x = batch.keys.float()
    return x, (x * x).sum(-1)


def test_seeding_ignores_the_tokens_the_join_took(layout, pool):
    """Tokens already assigned take no part: the others get the clusters they would get alone."""
    index = _index(layout, pool, seed_chunk=0)
    G, n = layout.groups, 40
    x, x2 = _seed_problem(layout, n, seed=3)
    tau = torch.full((G,), 2.0)
    taken = torch.rand(G, n, generator=torch.Generator().manual_seed(0)) < 0.5
    assign = torch.where(taken, 1000, -1)
    base = torch.full((G,), 7, dtype=torch.int64)
    made = seed_unassigned(index.config, assign, x, x2, tau, base)
    assert bool((assign[taken] == 1000).all()) and bool((assign[~taken] >= 7).all())
    for g in range(G):
        rest = (~taken[g]).nonzero().flatten()
        alone = torch.full((1, rest.numel()), -1, dtype=torch.int64)
        made_alone = seed_unassigned(index.config, alone, x[g:g + 1, rest], x2[g:g + 1, rest], tau[g:g + 1], torch.tensor([7]))
        assert torch.equal(assign[g, rest], alone[0]) and int(made[g]) == int(made_alone[0])


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_seeding_runs_never_share_a_cluster(layout, pool, chunk):
    """With seed_chunk = c, a new cluster's members are all in one run of c consecutive unassigned
    tokens, slots are dense from the group's first free one, and a chunk as large as the batch is
    the same as none."""
    G, n = layout.groups, 37
    x, x2 = _seed_problem(layout, n, seed=5)
    tau = torch.full((G,), 4.0)
    base = torch.arange(G, dtype=torch.int64)
    assign = torch.full((G, n), -1, dtype=torch.int64)
    made = seed_unassigned(_index(layout, pool, seed_chunk=chunk).config, assign, x, x2, tau, base)
    run = torch.arange(n) // chunk
    for g in range(G):
        slots = assign[g]
        assert torch.equal(torch.unique(slots), torch.arange(int(base[g]), int(base[g] + made[g])))
        for c in torch.unique(slots):
            assert torch.unique(run[slots == c]).numel() == 1
    whole = torch.full((G, n), -1, dtype=torch.int64)
    seed_unassigned(_index(layout, pool, seed_chunk=n).config, whole, x, x2, tau, base)
    none = torch.full((G, n), -1, dtype=torch.int64)
    seed_unassigned(_index(layout, pool, seed_chunk=0).config, none, x, x2, tau, base)
    assert torch.equal(whole, none)


def test_insert_is_all_or_nothing_when_pool_full(layout):
    pool = HostPool(layout, PoolConfig(capacity_bytes=24 * 1100, slab_tokens=8))
    index = _index(layout, pool)
    index.insert(make_batch(layout, 0, 8, seed=0, spread=0.0))
    before = (index.num_clusters.clone(), index.count.clone(), index.centroid.clone(), pool.free_slabs)
    with pytest.raises(PoolExhaustedError):
        index.insert(make_batch(layout, 8, 400, seed=1, spread=5.0))
    assert torch.equal(before[0], index.num_clusters)
    assert torch.equal(before[1], index.count[:, : before[1].shape[1]])
    assert torch.equal(before[2], index.centroid[:, : before[2].shape[1]])
    assert before[3] == pool.free_slabs


def test_splits_refused_during_query(layout, pool):
    index = _index(layout, pool)
    index.insert(make_batch(layout, 0, 50, seed=0))
    with index.query_guard(), pytest.raises(RuntimeError, match="query"):
        drain_splits(index)


def test_bad_batch_shapes_name_expected_and_got(layout, pool):
    index = _index(layout, pool)
    good = make_batch(layout, 0, 5, seed=0)
    bad = TokenBatch(good.keys[:, :, :8], good.values, good.order, good.time, good.pos)
    with pytest.raises(ValueError, match=r"keys: expected shape .* got"):
        index.insert(bad)
    with pytest.raises(ValueError, match="float"):
        index.insert(TokenBatch(good.keys.long(), good.values.long(), good.order, good.time, good.pos))


def test_a_dense_batch_seeds_in_one_round(monkeypatch):
    """Tokens of two tight regions, far more than max_size each: one seeding round makes every
    cluster they need (a seed's joiners beyond max_size fill further clusters), none over the cap,
    each within the cohesion bound."""
    from mosaic_ray.cache import cluster_index as ci
    from mosaic_ray.cache import seeding

    layout = KVLayout(1, 2, 8)
    pool = HostPool(layout, PoolConfig(capacity_bytes=1 << 22, slab_tokens=4))
    index = _index(layout, pool)  # max_size 32
    batch = make_batch(layout, 0, 200, seed=3, centers=2, spread=0.01)
    calls = []
    real = ci.ranks_within
    for module in (ci, seeding):  # the member ranks, and the seeding rounds
        monkeypatch.setattr(module, "ranks_within", lambda k: calls.append(1) or real(k))
    index.insert(batch)
    assert len(calls) == 2  # one seeding round + the member ranks
    assert int(index.count.max()) <= index.config.max_size
    assert int(index.count.sum()) == 200 * layout.groups
    assert int(index.num_clusters.min()) >= 2 * (100 // index.config.max_size)  # both regions, chunked
    assert bool((index.variances() <= index.thresholds()[:, None] + 1e-6).all())
