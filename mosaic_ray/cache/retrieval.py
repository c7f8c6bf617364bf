"""Retrievers: where a stream's past (tokens that left the local window) lives, and how a question
gets the part of it that matters, under a token budget per (layer, KV head).

    full     every past token's K/V stays on the device; the budget is ignored (accuracy reference)
    frame    ReKV-like: one block per frame, mean key on the device, top blocks fetched whole
    token    per-token top-B by query . key; keys stay on the device (counted), values fetched
    cluster  Mosaic: query . centroid, whole clusters fetched best-first

All four share the HostPool, the gather path and the selection code, so a measured ratio compares
methods, not code. Verbs: insert / retrieve / maintain / release (+ device_bytes / host_bytes).

Invariants: a retrieval never returns more than `budget` valid tokens per head (except `full`);
with a budget >= the past length, token, frame and cluster return exactly the past (so attention
is exact); what comes back is bit-exact with what was inserted.
"""

from __future__ import annotations

import math

import torch

from mosaic_ray.cache.cluster_index import ClusterIndex
from mosaic_ray.cache.coactivation import attended_members, log_attended, regroup
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.full_retriever import FullRetriever
from mosaic_ray.cache.gather import gather
from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.query_set import QuerySet
from mosaic_ray.cache.retriever import Retriever, _time_mask
from mosaic_ray.cache.selection import NEG_INF, greedy_fill, pack_in_order, prefix_positions, select_units, time_overlap
from mosaic_ray.cache.splitter import drain_splits
from mosaic_ray.cache.time_log import TimeLog, _grow
from mosaic_ray.cache.token_batch import Retrieved, Selection, TokenBatch
from mosaic_ray.config import CacheConfig, KVLayout
from mosaic_ray.kernels.gather_clusters import cluster_positions, gather_clusters


class TokenRetriever(Retriever):
    """Per-token top-B. Keys on the device (scored exactly), values in the pool (rows gathered)."""

    method = "token"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log = TimeLog(self.layout, self.pool, self.owner, self.device)
        self.keys = torch.empty(self.layout.groups, 0, self.layout.head_dim, dtype=self.layout.dtype, device=self.device)

    def insert(self, batch: TokenBatch) -> None:
        idx = self.log.append(batch)
        self.keys = _grow(self.keys, 1, self.log.size, 0)
        self.keys[:, idx] = batch.keys.to(self.device, self.layout.dtype)
        self.past_tokens = self.log.size

    host_parts = "v"

    def select(self, layer, query, budget, since=None, until=None) -> Selection:
        self._check_query(layer, query)
        N, g = self.log.size, self.groups_of(layer)
        scores = self._unit_scores(query, self.keys[g, :N])
        scores = scores.masked_fill(~_time_mask(self.log.time[:N], since, until)[None], NEG_INF)
        top = torch.topk(scores, min(budget, N), dim=1)
        idx = _sorted_ids(torch.where(torch.isfinite(top.values), top.indices, -1), N)
        return Selection(layer, self.log.rows(idx, g), idx)

    def _device_keys(self, sel: Selection) -> torch.Tensor:
        keys = self.keys[self.groups_of(sel.layer)]
        k = keys.gather(1, sel.idx.clamp(min=0)[..., None].expand(-1, -1, keys.shape[-1]))
        return k.masked_fill((sel.idx < 0)[..., None], 0)

    def device_bytes(self) -> int:
        n = self.log.size
        return n * self.layout.groups * self._row_bytes + n * (8 + 4 + 8 + 4 * self.layout.pos_dims)


def _sorted_ids(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Sort token ids ascending per row (time order), padding (-1) last."""
    s = torch.sort(idx.masked_fill(idx < 0, n + 1), dim=1).values
    return s.masked_fill(s > n, -1)


class FrameRetriever(Retriever):
    """ReKV-like blocks: one block per frame (or text segment), scored by its mean key."""

    method = "frame"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        G, D, dev = self.layout.groups, self.layout.head_dim, self.device
        self.log = TimeLog(self.layout, self.pool, self.owner, dev)
        self.rep_sum = torch.zeros(G, 0, D, dtype=torch.float32, device=dev)
        self.start = torch.zeros(0, dtype=torch.int64, device=dev)  # first token index of the block
        self.count = torch.zeros(0, dtype=torch.int64, device=dev)
        self.t_min = torch.zeros(0, dtype=torch.float32, device=dev)
        self.t_max = torch.zeros(0, dtype=torch.float32, device=dev)
        self.block_id = torch.zeros(0, dtype=torch.int64, device=dev)
        self.num_blocks = 0

    def insert(self, batch: TokenBatch) -> None:
        idx = self.log.append(batch)
        ids = batch.blocks().to(self.device)
        # block number of each token: continue the last block when the id repeats across batches
        new_block = torch.ones_like(ids, dtype=torch.bool)
        new_block[1:] = ids[1:] != ids[:-1]
        if self.num_blocks and int(ids[0]) == int(self.block_id[self.num_blocks - 1]):
            new_block[0] = False
        b = self.num_blocks - 1 + torch.cumsum(new_block.long(), 0)
        nb = int(b[-1]) + 1
        for name in ("start", "count", "t_min", "t_max", "block_id"):
            setattr(self, name, _grow(getattr(self, name), 0, nb, 0))
        self.rep_sum = _grow(self.rep_sum, 1, nb, 0)
        fresh = b[new_block]
        self.start[fresh] = idx[new_block]
        self.block_id[fresh] = ids[new_block]
        self.t_min[fresh] = float("inf")
        self.t_max[fresh] = float("-inf")
        t = batch.time.to(self.device, torch.float32)
        self.count.index_add_(0, b, torch.ones_like(b))
        self.t_min.scatter_reduce_(0, b, t, "amin")
        self.t_max.scatter_reduce_(0, b, t, "amax")
        self.rep_sum.index_add_(1, b, batch.keys.to(self.device, torch.float32))
        self.num_blocks = nb
        self.past_tokens = self.log.size

    def select(self, layer, query, budget, since=None, until=None) -> Selection:
        self._check_query(layer, query)
        F, g, H = self.num_blocks, self.groups_of(layer), self.layout.num_kv_heads
        budget = min(budget, self.past_tokens)
        reps = self.rep_sum[g, :F] / self.count[:F].clamp(min=1)[None, :, None].float()
        sizes = self.count[:F][None].expand(H, F)
        scores = self._unit_scores(query, reps, sizes)
        scores = scores.masked_fill(~time_overlap(self.t_min[:F], self.t_max[:F], since, until)[None], NEG_INF)
        if self.config.frame_top_k is not None and F > self.config.frame_top_k:
            kth = torch.topk(scores, self.config.frame_top_k, dim=1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, NEG_INF)
        # blocks best-first, laid out by position (the rows of select_units + pack_in_order, no sync)
        unit, member, valid = prefix_positions(scores, sizes, budget, self.config.fill)
        tok = torch.where(valid, self.start[:F][unit] + member, -1) if F else torch.full_like(unit, -1)
        return Selection(layer, self.log.rows(tok, g))

    def device_bytes(self) -> int:
        n, F = self.log.size, self.num_blocks
        return F * (self.layout.groups * self.layout.head_dim * 4 + 8 * 3 + 8) + n * (8 + 4 + 8 + 4 * self.layout.pos_dims)


class ClusterRetriever(Retriever):
    """Mosaic: cross-modal clusters scored by query . centroid, fetched whole, best-first."""

    method = "cluster"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.index = ClusterIndex(self.layout, self.config.cluster, self.pool, self.owner, self.device)
        # layer -> (QuerySet, budget) of the newest question not yet probed there, oldest layer first
        self._asked: dict[int, tuple] = {}

    def insert(self, batch: TokenBatch) -> None:
        self.index.insert(batch)
        self.past_tokens += batch.size

    def _scores(self, layer: int, query) -> torch.Tensor:
        """Scores of the layer's cluster slots [H, C]: a video cluster by its centroid, a text
        segment's by its best token's exact key, in one partition (no host sync; empty slots weigh
        nothing in a QuerySet's)."""
        ix = self.index
        g = slice(layer * self.layout.num_kv_heads, (layer + 1) * self.layout.num_kv_heads)
        bounds = (ix.kmin[g], ix.kmax[g]) if ix.bounded else None  # ClusterConfig.representative
        spread = ix.variances(g) / self.layout.head_dim if ix.config.representative == "spread" else None
        if ix.text_slot.shape[1] == 0:
            return self._unit_scores(query, ix.centroid[g], ix.count[g], bounds, spread)
        is_text, C = ix.text_mask(g), ix.capacity
        text_keys, slot = ix.text_keys[g].float(), ix.text_slot[g]
        reps = torch.cat([ix.centroid[g], text_keys], 1)
        sizes = torch.cat([ix.count[g].masked_fill(is_text, 0), (slot >= 0).long()], 1)  # padding weighs nothing
        if bounds is not None:  # a text token's bound is the token
            bounds = (torch.cat([bounds[0], text_keys], 1), torch.cat([bounds[1], text_keys], 1))
        if spread is not None:  # a text token is exact
            spread = torch.cat([spread, torch.zeros_like(ix.text_slot[g], dtype=spread.dtype)], 1)
        s = self._unit_scores(query, reps, sizes, bounds, spread)
        exact = s[:, C:].masked_fill(slot < 0, NEG_INF)
        return s[:, :C].masked_fill(is_text, NEG_INF).scatter_reduce(1, slot.clamp(min=0), exact, "amax")

    def _ranked(self, layer: int, query, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's clusters best-first: (order, sizes in that order, running total), [H, C]
        each, on the device; the clusters `CacheConfig.fill` does not take within `budget` have
        size 0 there (as empty cluster slots: taking them moves nothing)."""
        H = self.layout.num_kv_heads
        order = torch.argsort(self._scores(layer, query), dim=1, descending=True)
        sizes = self.index.count[layer * H : (layer + 1) * H].gather(1, order)
        if self.config.fill == "skip":
            sizes = greedy_fill(sizes, budget)
        return order, sizes, torch.cumsum(sizes, 1)

    # ------------------------------------------------------------------ co-activation
    @property
    def observes(self) -> bool:
        """Questions' attention reshapes the clusters (`ClusterConfig.coactivation` > 0)."""
        return self.index.config.coactivation > 0

    @property
    def pending_probes(self) -> int:
        """Layers whose question is observed but not yet probed (each `maintain` call probes one or
        more: an idle engine's upkeep runs until none is left)."""
        return len(self._asked)

    def observe(self, layer: int, query, budget: int) -> None:
        """Remember that a question asked layer `layer` with `query` at `budget` (`retrieve_into`
        does it on the question path; replays that retrieve at several budgets call it for one).
        Nothing is computed now: the next `maintain` does it (`_probe_asked`). A layer keeps only
        its newest question (what the next question attends is most like the last one's: module
        doc of cache/coactivation.py), so the backlog is at most one entry per layer."""
        if self.observes and isinstance(query, QuerySet):
            self._asked.pop(layer, None)
            self._asked[layer] = (query, budget)

    def _probe_asked(self, max_work: int | None) -> int:
        """For the questions remembered, layer by layer in the order asked: the layer's best
        clusters, `coactivation_probe` x its budget of them, scored member by member with their
        exact keys (read from the pool, off the question's path), and the members that would get
        most of its attention logged for `regroup`. A layer costs ceil(members read / max_size)
        units of upkeep (a split reads at most max_size members: one unit); at least one layer
        is probed per call, then layers while `max_work` lasts; the rest wait for the next call.
        Returns the units spent."""
        cfg, H = self.index.config, self.layout.num_kv_heads
        done = 0
        while self._asked and (max_work is None or done < max_work or done == 0):
            layer = next(iter(self._asked))
            query, budget = self._asked.pop(layer)
            width = min(self.past_tokens, math.ceil(budget * cfg.coactivation_probe))
            if width <= 0:
                continue
            g = slice(layer * H, (layer + 1) * H)
            ranked = self._ranked(layer, query, width)
            rows, _ = cluster_positions(*ranked, self.index.slabs[g], width, width, self.index.S)
            keys = gather(self.pool, rows, self.device, "k")["k"]
            share = cfg.coactivation * min(budget, self.past_tokens) / width
            log_attended(self.index, layer, *attended_members(query, keys, rows >= 0, *ranked, share))
            done += -(-width * H // cfg.max_size)
        return done

    def select(self, layer, query, budget, since=None, until=None) -> Selection:
        self._check_query(layer, query)
        ix, H = self.index, self.layout.num_kv_heads
        budget = min(budget, self.past_tokens)
        g = slice(layer * H, (layer + 1) * H)
        with ix.query_guard():
            if since is None and until is None:  # the rows `retrieve_into` moves, in its layout
                order, sizes, csum = self._ranked(layer, query, budget)
                rows, _ = cluster_positions(order, sizes, csum, ix.slabs[g], budget, budget, ix.S)
                return Selection(layer, rows)
            cnt, scores = ix.count[g], self._scores(layer, query)
            t_min, t_max = ix.t_min[g], ix.t_max[g]
            ok = (cnt > 0) & time_overlap(t_min, t_max, since, until)
            sizes = self._in_range_estimate(cnt, t_min, t_max, since, until)
            h, c = select_units(scores.masked_fill(~ok, NEG_INF), sizes, budget, self.config.fill)
            rows, _ = ix.member_rows(h + layer * H, c)
            return Selection(layer, pack_in_order(h, rows, H, budget))

    def retrieve_into(self, layer, query, budget, work, counts, since=None, until=None, prefetched=None):
        """Without a time range or a prefetch: clusters scored, sorted best-first and their members
        moved into the question's slots by one `gather_clusters` launch (the rows of `select`, in
        the same layout; nothing listed on the host, no sync)."""
        if since is not None or until is not None or prefetched is not None:
            sel = super().retrieve_into(layer, query, budget, work, counts, since, until, prefetched)
            if since is None and until is None:
                self.observe(layer, query, budget)
            return sel
        self._check_query(layer, query)
        ix, H, kv = self.index, self.layout.num_kv_heads, work.pool
        budget = min(budget, self.past_tokens)
        with ix.query_guard():
            order, sizes, csum = self._ranked(layer, query, budget)
            gpu = kv.k.is_cuda and self.pool.pinned
            gather_clusters(self.pool.kv, order, sizes, csum, ix.slabs[layer * H : (layer + 1) * H], budget,
                            work.retrieved[:budget], kv.k[layer], kv.v[layer], kv.valid[layer], counts,
                            backend="auto" if gpu else "torch")
        self.observe(layer, query, budget)
        return None

    def fetch(self, sel, since=None, until=None, prefetched=None) -> Retrieved:
        with self.index.query_guard():  # no split may move members while their rows are read
            return super().fetch(sel, since, until, prefetched)

    def fetch_into(self, sel, work, since=None, until=None, prefetched=None) -> torch.Tensor:
        with self.index.query_guard():
            return super().fetch_into(sel, work, since, until, prefetched)

    @staticmethod
    def _in_range_estimate(cnt, t_min, t_max, since, until) -> torch.Tensor:
        """Members expected inside [since, until], assuming a cluster's members spread evenly over its span."""
        lo = t_min if since is None else torch.maximum(t_min, torch.full_like(t_min, since))
        hi = t_max if until is None else torch.minimum(t_max, torch.full_like(t_max, until))
        span = (t_max - t_min).clamp(min=1e-6)
        frac = ((hi - lo).clamp(min=0) / span).where(t_max > t_min, torch.ones_like(span))
        return (cnt.float() * frac).ceil().long().clamp(min=1).minimum(cnt)

    def maintain(self, max_work: int | None = None) -> int:
        """Upkeep, up to `max_work` units: probe what the questions asked since the last call
        attended (co-activation, `_probe_asked`), regroup what that found (before anything else
        moves the members it names), then drain deferred splits with what is left. Returns the
        units done."""
        done = 0
        if self._asked:
            with self.index.query_guard():
                done += self._probe_asked(max_work)
        if self.index.attended:
            done += -(-regroup(self.index) // self.index.config.max_size)
        if max_work is not None and done >= max_work:
            return done
        return done + drain_splits(self.index, None if max_work is None else max_work - done)

    def device_bytes(self) -> int:
        return self.index.metadata_bytes()

    def release(self) -> int:
        self.past_tokens = 0
        self._asked.clear()
        return self.index.release()


RETRIEVERS: dict[str, type[Retriever]] = {
    r.method: r for r in (FullRetriever, FrameRetriever, TokenRetriever, ClusterRetriever)
}


def make_retriever(layout: KVLayout, config: CacheConfig, pool: HostPool, device: torch.device | str,
                   kv_pool: DeviceKVPool | None = None) -> Retriever:
    """The stream's retriever; `full` keeps its past in `kv_pool` (the engine's device pool)."""
    if config.retrieval == "full":
        return FullRetriever(layout, config, pool, device, kv_pool)
    return RETRIEVERS[config.retrieval](layout, config, pool, device)
