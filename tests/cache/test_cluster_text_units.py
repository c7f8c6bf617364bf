"""Text segments (captions, Q/A turns) in the cluster index: units of their own, never joined by a
frame's token nor split, their exact keys kept to score them by their best token; fetched whole."""

import torch

from cache_fixtures import make_batch
from mosaic_ray.cache.cluster_index import ClusterIndex
from mosaic_ray.cache.splitter import drain_splits
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.config import CacheConfig, ClusterConfig

MAX_SIZE = 32


def _index(layout, pool):
    return ClusterIndex(layout, ClusterConfig(split_size=16, max_size=MAX_SIZE), pool, pool.register_owner())


def _clusters(index, g):
    """{cluster slot: sorted member orders} of group g."""
    out = {}
    for c in range(int(index.num_clusters[g])):
        rows, valid = index.member_rows(torch.tensor([g]), torch.tensor([c]))
        _, _, order, _, _ = index.pool.read(rows[valid])
        if order.numel():
            out[c] = sorted(order.tolist())
    return out


def test_text_segments_are_their_own_clusters_never_joined_nor_split(layout, pool):
    index = _index(layout, pool)
    a = make_batch(layout, 0, 60, seed=1, tokens_per_block=20)  # blocks 0, 1, 2
    a.text = a.block == 1  # a caption of 20 tokens
    b = make_batch(layout, 60, 80, seed=2, tokens_per_block=40)  # blocks 1 (orders 60-79), 2, 3 (120-139)
    b.text = b.block == 2  # a Q/A turn of 40 tokens: two pieces (32 + 8)
    c = make_batch(layout, 140, 40, seed=3)
    c.keys = torch.cat([a.keys[:, 20:40], b.keys[:, 20:40]], 1)  # frames whose keys equal the text's
    for batch in (a, b, c):
        index.insert(batch)
    while drain_splits(index):
        pass
    caption, turn = set(range(20, 40)), set(range(80, 120))
    for g in range(layout.groups):
        clusters = _clusters(index, g)
        members = sorted(o for m in clusters.values() for o in m)
        assert members == list(range(180))  # every token in exactly one cluster
        text_units = [m for m in clusters.values() if set(m) & (caption | turn)]
        # each text unit holds one segment's consecutive tokens only, at most MAX_SIZE of them
        assert sorted(len(m) for m in text_units) == [8, 20, 32]
        for m in text_units:
            assert set(m) <= caption or set(m) <= turn
            assert m == list(range(m[0], m[0] + len(m)))
    assert index.text_keys.shape[1] == 60 and index.text_slot.shape == (layout.groups, 60)
    assert bool(index.text_mask().sum(1).eq(3).all()) and not bool((index.split_flag & index.text_mask()).any())


def test_a_caption_scored_by_its_best_token_is_fetched_whole(layout, pool):
    """One caption token points where the query looks; the caption's mean key does not. With a
    budget of one caption the whole caption comes back (text units are scored by their best token)."""
    cfg = CacheConfig(retrieval="cluster", offload_batch=1, budget_tokens=12, sink_tokens=2, window_tokens=8,
                      cluster=ClusterConfig(split_size=16, max_size=MAX_SIZE))
    cache = StreamCache(layout, cfg, pool, "cpu")
    video = make_batch(layout, 0, 60, seed=4)
    caption = make_batch(layout, 60, 12, seed=5, tokens_per_block=100)
    caption.text = torch.ones(12, dtype=torch.bool)
    q = torch.randn(layout.num_kv_heads, layout.head_dim)
    for h in range(layout.groups):  # token 65 is the query's direction, the rest of the caption opposite
        k = caption.keys[h] * 0 - q[h % layout.num_kv_heads] / 4
        k[5] = q[h % layout.num_kv_heads] * 4
        caption.keys[h] = k.to(caption.keys.dtype)
    tail = make_batch(layout, 72, 10, seed=6)
    for batch in (video, caption, tail):
        cache.append(batch)
    got = cache.retrieve(0, cache.query_for(0, q[None], layout.head_dim ** -0.5))
    for h in range(layout.num_kv_heads):
        orders = set(got.order[h][got.valid[h]].tolist())
        assert set(range(60, 72)) <= orders, (h, sorted(orders))


def test_with_text_units_off_text_is_clustered_like_video(layout, pool):
    index = ClusterIndex(layout, ClusterConfig(split_size=16, max_size=MAX_SIZE, text_units=False), pool,
                         pool.register_owner())
    a = make_batch(layout, 0, 60, seed=1, tokens_per_block=20)
    a.text = a.block == 1
    index.insert(a)
    assert index.text_slot.shape[1] == 0 and not bool(index.text_mask().any())


def test_text_units_survive_a_snapshot(layout, pool):
    from mosaic_ray.engine.stream_export import _RETRIEVER_FIELDS

    assert {"text_keys", "text_slot"} <= set(_RETRIEVER_FIELDS["cluster"][1][1])
