"""The four retrieval methods: budgets, exactness with a full budget, time ranges, cleanup."""

import pytest
import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig

METHODS = ["full", "frame", "token", "cluster"]
SINK, WINDOW = 4, 24


def _stream(layout, pool, method, budget, n_batches=8, n=29, scoring="mean", fill="prefix", representative="centroid"):
    cfg = CacheConfig(retrieval=method, offload_batch=1, budget_tokens=budget, sink_tokens=SINK, window_tokens=WINDOW,
                      cluster=ClusterConfig(split_size=16, max_size=32, representative=representative),
                      scoring=scoring, fill=fill)
    cache = StreamCache(layout, cfg, pool, "cpu")
    batches = [make_batch(layout, i * n, n, seed=i) for i in range(n_batches)]
    for b in batches:
        cache.append(b)
    while cache.maintain():
        pass
    return cache, batches


def _attend(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, -1)
    return w @ v


def _query(cache, layout, layer, q):
    """What the engine asks with for q [H, D] taken as one token of one query head per KV head."""
    return cache.query_for(layer, q[None], layout.head_dim ** -0.5)


@pytest.mark.parametrize("scoring,fill,rep", [("mean", "prefix", "centroid"), ("max", "prefix", "centroid"),
                                              ("max", "skip", "centroid"), ("max", "skip", "bound"),
                                              ("mean", "prefix", "bound"), ("max", "skip", "spread"),
                                              ("mass", "skip", "spread")])
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_gives_exact_attention(layout, pool, method, scoring, fill, rep):
    if rep != "centroid" and method != "cluster":
        pytest.skip("a cluster representative")
    cache, batches = _stream(layout, pool, method, budget=10_000, scoring=scoring, fill=fill, representative=rep)
    keys = torch.cat([b.keys for b in batches], 1)
    values = torch.cat([b.values for b in batches], 1)
    for layer in range(layout.num_layers):
        q = torch.randn(layout.num_kv_heads, layout.head_dim)
        got = cache.retrieve(layer, _query(cache, layout, layer, q))
        k_res, v_res, _ = cache.resident(layer)
        k = torch.cat([k_res[:, :SINK], got.keys, k_res[:, SINK:]], 1)
        v = torch.cat([v_res[:, :SINK], got.values, v_res[:, SINK:]], 1)
        assert bool(got.valid.all()) and got.tokens == layout.num_kv_heads * cache.past_tokens
        g = slice(layer * layout.num_kv_heads, (layer + 1) * layout.num_kv_heads)
        torch.testing.assert_close(_attend(q[:, None], k, v), _attend(q[:, None], keys[g], values[g]))
        # retrieved tokens come back in time order, bit-exact
        assert torch.equal(got.keys, keys[g][:, got.order[0]])


@pytest.mark.parametrize("scoring,fill", [("mean", "prefix"), ("max", "skip")])
@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
@pytest.mark.parametrize("budget", [1, 7, 40, 100])
def test_selection_never_exceeds_budget(layout, pool, method, budget, scoring, fill):
    cache, _ = _stream(layout, pool, method, budget=budget, scoring=scoring, fill=fill)
    for layer in range(layout.num_layers):
        got = cache.retrieve(layer, _query(cache, layout, layer, torch.randn(layout.num_kv_heads, layout.head_dim)))
        assert int(got.valid.sum(1).max()) <= budget
        order = got.order.masked_fill(~got.valid, 1 << 40)
        assert bool((order[:, 1:] >= order[:, :-1]).all())


@pytest.mark.parametrize("method", METHODS)
def test_time_range_restricts_members(layout, pool, method):
    cache, _ = _stream(layout, pool, method, budget=60)
    got = cache.retrieve(1, torch.randn(layout.num_kv_heads, layout.head_dim), since=3.0, until=9.0)
    times = got.order[got.valid].float() * 0.1
    assert got.tokens > 0 and bool(((times >= 3.0 - 1e-5) & (times <= 9.0 + 1e-5)).all())


def test_token_retrieval_is_exact_top_b(layout, pool):
    cache, batches = _stream(layout, pool, "token", budget=13)
    keys = torch.cat([b.keys for b in batches], 1)
    q = torch.randn(layout.num_kv_heads, layout.head_dim)
    got = cache.retrieve(0, q)
    past = keys[: layout.num_kv_heads, SINK : SINK + cache.past_tokens]
    best = torch.topk(torch.einsum("hnd,hd->hn", past, q), 13).indices + SINK
    assert torch.equal(torch.sort(best, 1).values, got.order)


def test_cluster_uses_fewer_copies_than_token(layout, pool):
    cl, _ = _stream(layout, pool, "cluster", budget=64, n_batches=16)
    tk, _ = _stream(layout, pool, "token", budget=64, n_batches=16)
    q = torch.randn(layout.num_kv_heads, layout.head_dim)
    assert cl.retrieve(0, q).copies < tk.retrieve(0, q).copies


@pytest.mark.parametrize("method", METHODS)
def test_device_memory_bounded_for_cluster_and_release(layout, pool, method):
    cache, _ = _stream(layout, pool, method, budget=32, n_batches=12)
    assert cache.resident_tokens == SINK + WINDOW
    assert cache.host_bytes() > 0 or method == "full"
    cache.release()
    assert pool.free_slabs == pool.num_slabs and cache.past_tokens == 0


def test_query_shape_error(layout, pool):
    cache, _ = _stream(layout, pool, "cluster", budget=8, n_batches=2)
    with pytest.raises(ValueError, match=r"expected shape .* got"):
        cache.retrieve(0, torch.randn(3, layout.head_dim))
    with pytest.raises(ValueError, match="layer"):
        cache.retrieve(9, torch.randn(layout.num_kv_heads, layout.head_dim))


def test_skip_filling_takes_at_least_what_the_prefix_takes(layout, pool):
    pre, _ = _stream(layout, pool, "cluster", budget=40)
    skip, _ = _stream(layout, pool, "cluster", budget=40, fill="skip")
    for layer in range(layout.num_layers):
        q = torch.randn(layout.num_kv_heads, layout.head_dim)
        a, b = pre.retrieve(layer, q), skip.retrieve(layer, q)
        assert bool((b.valid.sum(1) >= a.valid.sum(1)).all()) and int(b.valid.sum(1).max()) <= 40


def test_mass_scoring_is_exact_top_b_by_true_attention_and_reproduces_its_output(layout, pool):
    """scoring="mass" with the token method selects, per KV head, the B past tokens the question's
    queries (3 tokens here) give the most attention, softmax over resident + whole past; attending
    resident + retrieved then equals attention restricted to those tokens, positions and all."""
    B, T = 13, 3
    cache, batches = _stream(layout, pool, "token", budget=B, scoring="mass")
    keys = torch.cat([b.keys for b in batches], 1).float()
    values = torch.cat([b.values for b in batches], 1).float()
    scale = layout.head_dim ** -0.5
    H, P = layout.num_kv_heads, cache.past_tokens
    for layer in range(layout.num_layers):
        q = torch.randn(T, H, layout.head_dim)  # one query head per KV head in this layout's test
        got = cache.retrieve(layer, cache.query_for(layer, q, scale))
        k_res, v_res, _ = cache.resident(layer)
        g = slice(layer * H, (layer + 1) * H)
        past_k, past_v = keys[g, SINK:SINK + P], values[g, SINK:SINK + P]
        logits = torch.einsum("thd,hnd->htn", q, torch.cat([k_res.float(), past_k], 1)) * scale
        mass = torch.softmax(logits, 2)[:, :, k_res.shape[1]:].mean(1)  # [H, P]
        best = torch.sort(torch.topk(mass, B).indices, 1).values
        assert torch.equal(best + SINK, got.order)
        ref_k = torch.cat([k_res.float(), past_k.gather(1, best[..., None].expand(-1, -1, past_k.shape[2]))], 1)
        ref_v = torch.cat([v_res.float(), past_v.gather(1, best[..., None].expand(-1, -1, past_v.shape[2]))], 1)
        ours_k = torch.cat([k_res.float(), got.keys.float()], 1)
        ours_v = torch.cat([v_res.float(), got.values.float()], 1)
        qh = q.permute(1, 0, 2)  # [H, T, D]
        torch.testing.assert_close(_attend(qh, ours_k, ours_v), _attend(qh, ref_k, ref_v))
