"""Co-activation (cache/coactivation.py): the members a question attended most leave their
clusters for exact units at the next maintenance; every token stays in exactly one cluster with its
K/V unchanged, parents' statistics are their remaining members', and the exact units' keys are
the members' own. Compared against plain recomputation from the pool."""

import math

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.cluster_index import ClusterIndex
from mosaic_ray.cache.coactivation import attended_members, log_attended, regroup
from mosaic_ray.cache.query_set import query_set
from mosaic_ray.cache.splitter import drain_splits
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig
from mosaic_ray.kernels.gather_clusters import cluster_positions

MAX_SIZE, UNIT = 32, 3


def _index(layout, pool, **cfg):
    cfg = {"split_size": 16, "max_size": MAX_SIZE, "coactivation": 0.25, "coactivation_unit": UNIT,
           "coactivation_max_share": 1.0, **cfg}
    return ClusterIndex(layout, ClusterConfig(**cfg), pool, pool.register_owner())


def _filled(layout, pool, **cfg):
    index = _index(layout, pool, **cfg)
    batches = [make_batch(layout, 0, 70, seed=1), make_batch(layout, 70, 50, seed=2)]
    for b in batches:
        index.insert(b)
    while drain_splits(index):
        pass
    keys = torch.cat([b.keys for b in batches], 1)  # [G, 120, D] by order
    return index, keys


def _members(index, g):
    """{slot: (orders in member order, keys [n, D], times)} of group g's used clusters."""
    out = {}
    for c in range(int(index.num_clusters[g])):
        rows, valid = index.member_rows(torch.tensor([g]), torch.tensor([c]))
        k, _, order, time, _ = index.pool.read(rows[valid])
        if order.numel():
            out[c] = (order.tolist(), k.float(), time.float())
    return out


def _pick(index, g, want):
    """(cluster, member) of each order in `want` for group g."""
    where = {o: (c, i) for c, (orders, _, _) in _members(index, g).items() for i, o in enumerate(orders)}
    return [where[o] for o in want]


def _check_exact(index, keys):
    for g in range(index.layout.groups):
        clusters = _members(index, g)
        assert sorted(o for orders, _, _ in clusters.values() for o in orders) == list(range(keys.shape[1]))
        for c, (orders, k, t) in clusters.items():
            assert torch.equal(k, keys[g, orders].float())  # K rows unchanged
            assert orders == sorted(orders)  # members in stream order
            assert int(index.count[g, c]) == len(orders)
            torch.testing.assert_close(index.centroid[g, c], k.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(index.sumsq[g, c], (k * k).sum(), atol=1e-3, rtol=1e-5)
            assert float(index.t_min[g, c]) == float(t.min()) and float(index.t_max[g, c]) == float(t.max())


def test_regroup_moves_the_attended_members_into_exact_units_and_keeps_every_token_once(layout, pool):
    index, keys = _filled(layout, pool)
    hot = {0: [3, 50, 51, 52, 90, 119, 7], 3: [10, 11]}  # group -> orders attended
    weights = {0: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], 3: [0.2, 0.1]}
    before_units = index.num_clusters.clone()
    for g, orders in hot.items():
        cm = torch.tensor(_pick(index, g, orders))
        H = layout.num_kv_heads
        layer, h = divmod(g, H)
        cl = torch.zeros(H, len(orders), dtype=torch.int64)
        mem = torch.zeros_like(cl)
        w = torch.zeros(H, len(orders))
        cl[h], mem[h], w[h] = cm[:, 0], cm[:, 1], torch.tensor(weights[g])
        log_attended(index, layer, cl, mem, w)
    # a duplicate (the larger weight counts) and a stale entry (member past the cluster's count)
    c0, m0 = _pick(index, 0, [3])[0]
    log_attended(index, 0, torch.tensor([[c0], [0]]), torch.tensor([[m0], [0]]), torch.tensor([[0.05], [0.0]]))
    log_attended(index, 0, torch.tensor([[c0], [0]]), torch.tensor([[MAX_SIZE - 1], [0]]), torch.tensor([[1.0], [0.0]]))
    moved = regroup(index)
    assert moved == 9 and not index.attended
    _check_exact(index, keys)
    ex = index.text_mask()
    for g in range(layout.groups):
        units = {c: orders for c, (orders, _, _) in _members(index, g).items() if ex[g, c]}
        got = sorted(o for orders in units.values() for o in orders)
        assert got == sorted(hot.get(g, []))
        assert all(len(o) <= UNIT for o in units.values())
        n_units = -(-len(hot.get(g, [])) // UNIT)
        assert int(index.num_clusters[g] - before_units[g]) == n_units
        # hottest together: the first unit of group 0 holds its three largest weights
        if g == 0:
            assert units[int(before_units[0])] == sorted([3, 50, 51])
        # the exact keys are the units' members' keys, each with its unit's slot
        slot = index.text_slot[g]
        for c, orders in units.items():
            rows = index.text_keys[g][slot == c].float()
            assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, keys[g, orders].float().tolist()))
        assert int((slot >= 0).sum()) == len(hot.get(g, []))
    assert not bool((index.split_flag & ex).any())
    # frames arriving later never join an exact unit
    index.insert(make_batch(layout, 120, 40, seed=3))
    keys = torch.cat([keys, make_batch(layout, 120, 40, seed=3).keys], 1)
    while drain_splits(index):
        pass
    _check_exact(index, keys)
    for g, orders in hot.items():
        units = [o for c, (o, _, _) in _members(index, g).items() if index.text_mask()[g, c]]
        assert sorted(x for o in units for x in o) == sorted(orders)


def test_the_exact_share_caps_what_is_regrouped_hottest_first(layout, pool):
    index, keys = _filled(layout, pool, coactivation_max_share=0.05)  # 120 tokens: room for 6
    orders = list(range(0, 40, 4))  # 10 attended members of group 1
    cm = torch.tensor(_pick(index, 1, orders))
    H = layout.num_kv_heads
    cl, mem, w = torch.zeros(H, 10, dtype=torch.int64), torch.zeros(H, 10, dtype=torch.int64), torch.zeros(H, 10)
    cl[1], mem[1], w[1] = cm[:, 0], cm[:, 1], torch.linspace(1.0, 0.1, 10)
    log_attended(index, 0, cl, mem, w)
    assert regroup(index) == 6
    assert index.coactivated.tolist() == [0, 6] + [0] * (layout.groups - 2)
    _check_exact(index, keys)
    exact = sorted(o for c, (o, _, _) in _members(index, 1).items() for _ in [0] if index.text_mask()[1, c])
    assert sorted(x for o in exact for x in o) == orders[:6]
    # full: nothing more is regrouped in that group
    log_attended(index, 0, cl, mem, w)
    assert regroup(index) == 0


def test_regroup_refuses_to_run_while_a_query_holds_the_index(layout, pool):
    index, _ = _filled(layout, pool)
    index.attended.append(tuple(torch.zeros(1, dtype=t) for t in (torch.int64, torch.int64, torch.int64, torch.float32)))
    with index.query_guard(), pytest.raises(RuntimeError):
        regroup(index)


def test_attended_members_finds_the_retrieved_member_and_the_attention_it_got(layout, pool):
    """Against a plain softmax over resident + retrieved keys, and the rows the retrieval moved."""
    index, keys = _filled(layout, pool)
    H, D, layer = layout.num_kv_heads, layout.head_dim, 1
    g = slice(layer * H, (layer + 1) * H)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, 2 * H, D, generator=gen)
    k_res = torch.randn(H, 6, D, generator=gen)
    qs = query_set(q, k_res, 1 / math.sqrt(D), H)
    budget = 40
    scores = torch.randn(H, index.capacity, generator=gen)
    order = torch.argsort(scores, dim=1, descending=True)
    sizes = index.count[g].gather(1, order)
    csum = torch.cumsum(sizes, 1)
    rows, _ = cluster_positions(order, sizes, csum, index.slabs[g], budget, budget, index.S)
    valid = rows >= 0
    kret = index.pool.read(rows.clamp(min=0).flatten())[0].view(H, budget, D).float() * valid[..., None]
    cl, mem, w = attended_members(qs, kret, valid, order, sizes, csum, 0.25)
    assert cl.shape == (H, 10)
    for h in range(H):
        logits = torch.cat([qs.q[h] @ k_res[h].T, (qs.q[h] @ kret[h].T).masked_fill(~valid[h][None], -math.inf)], 1)
        paid = torch.softmax(logits, 1)[:, 6:].mean(0)
        top = torch.topk(paid, 10)
        torch.testing.assert_close(w[h], top.values, atol=1e-5, rtol=1e-4)
        member_rows, _ = index.member_rows(torch.full_like(cl[h], layer * H + h), cl[h])
        assert torch.equal(member_rows.gather(1, mem[h][:, None]).squeeze(1), rows[h, top.indices])


def test_a_question_reshapes_the_clusters_and_its_hot_token_then_scores_first(layout):
    """End to end through StreamCache: one past token is where the question looks, inside a cluster
    of others; after the question's retrieval and one maintenance it is an exact unit, scored first."""
    from mosaic_ray.cache.host_pool import HostPool

    cfg = CacheConfig(retrieval="cluster", offload_batch=1, budget_tokens=24, sink_tokens=2, window_tokens=8,
                      cluster=ClusterConfig(split_size=32, max_size=64, coactivation=0.1, coactivation_unit=1,
                                            coactivation_max_share=0.5))
    pool = HostPool(layout, cfg.pool)
    cache = StreamCache(layout, cfg, pool, "cpu")
    batch = make_batch(layout, 0, 120, seed=7, spread=0.05)
    H = layout.num_kv_heads
    batch.keys[:, 30] *= 1.15  # near its centre (it joins the centre's cluster), but longer
    target = batch.keys[:, 30].float()  # the query looks at token 30's key
    cache.append(batch)
    while cache.maintain(None):
        pass
    queries = [target[layer * H:(layer + 1) * H].repeat_interleave(2, 0)[None].expand(3, -1, -1)
               for layer in range(layout.num_layers)]
    ix = cache.retriever.index
    for g in range(layout.groups):  # before: token 30 shares a cluster with others
        assert any(30 in orders and len(orders) > 1 for orders, _, _ in _members(ix, g).values())
    for layer, q in enumerate(queries):
        cache.retriever.observe(layer, cache.query_for(layer, q, 1.0), cfg.budget_tokens)
    while cache.maintain(None):
        pass
    for g in range(layout.groups):
        slot = ix.text_slot[g]
        units = set(slot[slot >= 0].tolist())
        assert any(30 in _members(ix, g)[c][0] for c in units)
    for layer, q in enumerate(queries):
        query = cache.query_for(layer, q, 1.0)
        best = cache.retriever._scores(layer, query).argmax(1)
        for h in range(H):
            assert 30 in _members(ix, layer * H + h)[int(best[h])][0]


def test_with_the_mean_query_there_is_nothing_to_observe(layout):
    """Co-activation needs every query of a question (scoring "max" or "mass"): with "mean" the
    attention each member got is not known, so questions leave the clusters as they are."""
    from mosaic_ray.cache.host_pool import HostPool

    cfg = CacheConfig(retrieval="cluster", scoring="mean", offload_batch=1, budget_tokens=24, sink_tokens=2,
                      window_tokens=8, cluster=ClusterConfig(split_size=32, max_size=64, coactivation=1.0))
    cache = StreamCache(layout, cfg, HostPool(layout, cfg.pool), "cpu")
    cache.append(make_batch(layout, 0, 120, seed=3))
    while cache.maintain(None):
        pass
    r = cache.retriever
    for layer in range(layout.num_layers):
        r.observe(layer, cache.query_for(layer, torch.randn(3, 2 * layout.num_kv_heads, layout.head_dim), 1.0), 24)
    assert not r._asked
    while cache.maintain(None):
        pass
    assert int(r.index.coactivated.sum()) == 0


def test_probing_is_upkeep_in_pieces_each_layer_regrouped_as_it_is_probed(layout):
    """`maintain(max_work)` probes a layer per ceil(members read / max_size) units, at least one per
    call, and regroups what it found before anything else can move those members; a layer keeps
    only its newest question, so the backlog is at most a question per layer."""
    from mosaic_ray.cache.host_pool import HostPool

    cfg = CacheConfig(retrieval="cluster", offload_batch=1, budget_tokens=24, sink_tokens=2, window_tokens=8,
                      cluster=ClusterConfig(split_size=32, max_size=64, coactivation=0.5, coactivation_unit=1,
                                            coactivation_max_share=0.5, coactivation_probe=2.0))
    cache = StreamCache(layout, cfg, HostPool(layout, cfg.pool), "cpu")
    cache.append(make_batch(layout, 0, 120, seed=3))
    while cache.maintain(None):
        pass
    H, r = layout.num_kv_heads, cache.retriever
    for _question in range(3):  # three questions, each over every layer: one entry per layer is kept
        for layer in range(layout.num_layers):
            q = torch.randn(3, 2 * H, layout.head_dim)
            r.observe(layer, cache.query_for(layer, q, 1.0), cfg.budget_tokens)
    assert sorted(r._asked) == list(range(layout.num_layers))
    per_layer = math.ceil(min(r.past_tokens, 2 * cfg.budget_tokens) * H / 64)
    for layer in range(layout.num_layers):
        before = r.index.coactivated.clone()
        assert cache.maintain(1, offload=False) >= per_layer  # one layer, though it costs more than 1
        assert len(r._asked) == layout.num_layers - layer - 1 and not r.index.attended  # regrouped at once
        grew = (r.index.coactivated > before).nonzero().flatten().tolist()
        assert grew and all(g // H == layer for g in grew)  # only the probed layer's groups changed


def test_units_of_one_layer_at_a_time_leave_no_padding_behind(layout, pool):
    """Regroups of one layer's groups, one after another: the exact keys table stays as wide as the
    group with most exact tokens (rows compacted), not the sum of every call's widest group."""
    index, keys = _filled(layout, pool)
    H = layout.num_kv_heads
    for layer in range(layout.num_layers):
        orders = [5 + layer, 60 + layer, 100 + layer]
        cl, mem = torch.zeros(H, 3, dtype=torch.int64), torch.zeros(H, 3, dtype=torch.int64)
        w = torch.zeros(H, 3)
        cm = torch.tensor(_pick(index, layer * H, orders))
        cl[0], mem[0], w[0] = cm[:, 0], cm[:, 1], torch.tensor([0.9, 0.8, 0.7])
        log_attended(index, layer, cl, mem, w)
        assert regroup(index) == 3
    assert index.text_slot.shape[1] == 3  # every touched group holds 3, the others none
    assert int((index.text_slot >= 0).sum()) == 3 * layout.num_layers
    _check_exact(index, keys)


def test_a_unit_larger_than_a_cluster_is_a_full_cluster(layout, pool):
    """The default unit (8) must not refuse configs of small clusters: a unit is cut at max_size."""
    index, keys = _filled(layout, pool, coactivation_unit=1000)
    orders = list(range(0, 120, 3))  # 40 attended members of group 2, more than max_size (32)
    cm = torch.tensor(_pick(index, 2, orders))
    H = layout.num_kv_heads
    layer, h = divmod(2, H)
    cl, mem, w = (torch.zeros(H, 40, dtype=torch.int64), torch.zeros(H, 40, dtype=torch.int64), torch.zeros(H, 40))
    cl[h], mem[h], w[h] = cm[:, 0], cm[:, 1], torch.linspace(1.0, 0.1, 40)
    log_attended(index, layer, cl, mem, w)
    assert regroup(index) == 40
    units = set(index.text_slot[2][index.text_slot[2] >= 0].tolist())
    assert sorted(int(index.count[2, u]) for u in units) == [8, MAX_SIZE]
    _check_exact(index, keys)
