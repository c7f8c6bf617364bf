"""Co-activation: clusters reshaped by the attention questions actually paid (issue 19 item 4).

Clusters are built from key distance alone, so one cluster holds members a question attends and
members it ignores, and its centroid averages the first away (the centroid scores them low) while
fetching it whole spends the budget on the second. What questions attend persists while the
stream stays where it is: on real SmolLM2-135M keys of real video (the fidelity stream), the
exact top 5 % of the past by the attention of the questions asked before holds 0.94-0.999 of the
top-5 % mass of the next question asked at the same point, though only 0.03 for a question 3.3k
tokens later (`scaling_bench/attention_persistence.py`, docs/results/attention_persistence.md).
So the attention questions pay reshapes the clusters, in three steps, none on a question's path:

  observe   (`ClusterRetriever.observe`, called by `retrieve_into`): the question's QuerySet and
            budget per layer are kept (the newest question per layer); nothing is computed.
  probe     (`ClusterRetriever._probe_asked`, at the next upkeep, a layer or more per call
            under the scheduler's time share) `attended_members`: the
            question's best clusters, `coactivation_probe` x its budget of them, are read back
            (keys only) and each member's attention computed exactly, as the mean over the
            question's queries of exp(q . k - log Z), Z over the resident and the probed tokens;
            so members the question did not retrieve are found too. The `coactivation x budget`
            most attended members per (layer, KV head) are logged on the index as (group,
            cluster, member, weight).
  regroup   (right after the probe, in the same call, never while a query holds the index, like
            splits, so nothing moves the logged members in between): the logged
            members leave their clusters for exact units of `coactivation_unit` tokens, the
            hottest together, members of several clusters merged (co-attended). An exact unit
            keeps its tokens' keys on the device and is scored by its best token, as a text
            segment is; no frame token joins it and no split touches it. The parent keeps its
            cold members, rewritten into its first slabs, its statistics recomputed exactly.

Invariants (tested): every token stays in exactly one cluster and its K/V rows are unchanged; a
parent's count, centroid, variance and time span are those of its remaining members; a unit's
members are in stream order; the tokens co-activation made exact in a (layer, KV head)
(`ClusterIndex.coactivated`) stay at most `coactivation_max_share` of its tokens (text units,
exact anyway, are not counted); stale log entries (a member gone or a cluster made exact since)
are dropped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from mosaic_ray.cache.gather import gather
from mosaic_ray.cache.query_set import QuerySet

if TYPE_CHECKING:
    from mosaic_ray.cache.cluster_index import ClusterIndex

_INF = float("inf")


def attended_members(query: QuerySet, keys: torch.Tensor, valid: torch.Tensor, order: torch.Tensor,
                     sizes: torch.Tensor, csum: torch.Tensor, share: float) -> tuple[torch.Tensor, ...]:
    """The most attended of one layer's probed members: keys [H, B, D] / valid [H, B] in a
    retrieval's layout (position p of head h is a member of the k-th cluster of `order` [H, C]
    with csum[h, k - 1] <= p < csum[h, k], `sizes` the clusters' taken sizes in that order).
    Returns (cluster, member, weight) [H, k] each, k = ceil(share x B); weight 0 marks no entry."""
    H, B, _ = keys.shape
    C = order.shape[1]
    k = min(B, max(1, math.ceil(share * B)))
    logits = torch.bmm(keys.float(), query.q.transpose(1, 2)).masked_fill(~valid[..., None], -_INF)  # [H, B, Q]
    log_z = torch.logaddexp(query.log_z, torch.logsumexp(logits, 1))  # [H, Q]
    paid = torch.exp(logits - log_z[:, None, :]).mean(2)  # [H, B]; 0 where not valid
    weight, pos = torch.topk(paid, k, dim=1)
    unit = torch.searchsorted(csum, pos, right=True).clamp(max=max(0, C - 1))
    member = pos - (csum.gather(1, unit) - sizes.gather(1, unit))
    weight = weight * valid.gather(1, pos)
    return order.gather(1, unit), member, weight


def log_attended(index: "ClusterIndex", layer: int, cluster: torch.Tensor, member: torch.Tensor,
                 weight: torch.Tensor) -> None:
    """Keep what `attended_members` found for layer `layer` until the next `regroup` (device
    tensors only: no sync)."""
    H = cluster.shape[0]
    g = (torch.arange(H, device=cluster.device) + layer * H)[:, None].expand_as(cluster)
    index.attended.append((g.flatten(), cluster.flatten(), member.flatten(), weight.flatten().float()))


def _ranks_in_runs(key: torch.Tensor) -> torch.Tensor:
    """For a sorted key [n], each entry's rank among the entries with its key."""
    first = torch.searchsorted(key, key)
    return torch.arange(key.numel(), device=key.device) - first


def _logged(index: "ClusterIndex") -> tuple[torch.Tensor, ...] | None:
    """The log as unique (g, c, member, weight) entries, sorted by group then weight descending,
    cut to each group's room for exact tokens; None when nothing is left."""
    g, c, m, w = (torch.cat([a[i] for a in index.attended]) for i in range(4))
    index.attended.clear()
    cap, M = index.capacity, index.config.max_size
    cc = c.clamp(max=cap - 1)
    ok = (w > 0) & (c < index.num_clusters[g]) & (m >= 0) & (m < index.count[g, cc]) & ~index.text_mask()[g, cc]
    key = ((g * cap + c) * M + m)[ok]
    if key.numel() == 0:
        return None
    uk, inv = torch.unique(key, return_inverse=True)
    w = torch.zeros(uk.numel(), device=uk.device).scatter_reduce_(0, inv, w[ok], "amax", include_self=False)
    g, c, m = uk // (cap * M), (uk // M) % cap, uk % M
    by_w = torch.argsort(w, descending=True, stable=True)
    s = by_w[torch.argsort(g[by_w], stable=True)]
    g, c, m, w = g[s], c[s], m[s], w[s]
    share = index.config.coactivation_max_share
    room = (share * index.key_count).floor().long() - index.coactivated  # [G]
    keep = _ranks_in_runs(g) < room[g]
    if not bool(keep.any()):
        return None
    return g[keep], c[keep], m[keep], w[keep]


def regroup(index: "ClusterIndex") -> int:
    """Apply the log (module doc); returns the members moved into exact units."""
    if index.querying:
        raise RuntimeError("regroup called while a query holds the cluster index")
    if not index.attended:
        return 0
    entries = _logged(index)
    if entries is None:
        return 0
    g, c, m, _w = entries
    dev, S, cfg = index.device, index.S, index.config
    # the parents, and which of their members leave
    parents, pinv = torch.unique(g * index.capacity + c, return_inverse=True)
    pg, pc = parents // index.capacity, parents % index.capacity
    rows, valid = index.member_rows(pg, pc)
    hot = torch.zeros_like(valid)
    hot[pinv, m] = True
    got = gather(index.pool, rows, dev, "kv")
    # the units: per group, entries in order of weight, `coactivation_unit` at a time
    rank = _ranks_in_runs(g)  # entries are sorted by group
    G = index.layout.groups
    per_group = torch.zeros(G, dtype=torch.int64, device=dev).index_add_(0, g, torch.ones_like(g))
    unit = min(cfg.coactivation_unit, cfg.max_size)  # a unit is a cluster: at most max_size members
    units_per_group = -(-per_group // unit)
    index.ensure_capacity(int((index.num_clusters + units_per_group).max()))
    slot = index.num_clusters[g] + rank // unit
    # members of a unit in stream order: rank in unit by order
    order_of = got["order"][pinv, m]
    by_order = torch.argsort(order_of, stable=True)
    ukey = g * index.capacity + slot
    s = by_order[torch.argsort(ukey[by_order], stable=True)]
    in_unit = torch.empty_like(rank)
    in_unit[s] = _ranks_in_runs(ukey[s])
    units, uinv = torch.unique(ukey, return_inverse=True)
    usize = torch.zeros(units.numel(), dtype=torch.int64, device=dev).index_add_(0, uinv, torch.ones_like(uinv))
    # slabs: parents keep their first ones for the cold members; units get new ones
    cold = valid & ~hot
    n0 = cold.sum(1)
    need0, need_u = -(-n0 // S), -(-usize // S)
    new_slabs = index.pool.allocate(int(need_u.sum()), index.owner).to(dev)
    R = index.max_slabs
    j = torch.arange(R, device=dev)[None, :]
    old_slabs = index.slabs[pg, pc]
    parent_slabs = torch.where(j < need0[:, None], old_slabs, -1)
    freed = old_slabs[(j >= need0[:, None]) & (old_slabs >= 0)]
    first = torch.cumsum(need_u, 0) - need_u
    take = (first[:, None] + j).clamp(max=max(0, new_slabs.numel() - 1))
    unit_slabs = torch.where(j < need_u[:, None], new_slabs[take] if new_slabs.numel() else -1, -1)
    # destination rows: cold members by their rank among the parent's cold ones, hot by in_unit
    rank0 = torch.cumsum(cold.long(), 1) - 1
    cold_dst = parent_slabs.gather(1, (rank0 // S).clamp(min=0)) * S + rank0 % S
    hot_dst = unit_slabs[uinv, in_unit // S] * S + in_unit % S
    pi, mi = cold.nonzero(as_tuple=True)
    src_p, src_m = torch.cat([pi, pinv]), torch.cat([mi, m])
    dst = torch.cat([cold_dst[pi, mi], hot_dst])
    part = lambda name: got[name][src_p, src_m]  # noqa: E731
    index.pool.write(dst, part("k"), part("v"), part("order"), part("time"), part("pos"))
    # exact statistics of parents (cold members) and units (hot members)
    side = torch.cat([pi, parents.numel() + uinv])
    n_sides = parents.numel() + units.numel()
    keys = part("k").float()
    D = keys.shape[1]
    cnt = torch.zeros(n_sides, dtype=torch.int64, device=dev).index_add_(0, side, torch.ones_like(side))
    ksum = torch.zeros(n_sides, D, device=dev).index_add_(0, side, keys)
    ksq = torch.zeros(n_sides, device=dev).index_add_(0, side, (keys * keys).sum(1))
    t = part("time").float()
    tmin = torch.full((n_sides,), _INF, device=dev).scatter_reduce_(0, side, t, "amin")
    tmax = torch.full((n_sides,), -_INF, device=dev).scatter_reduce_(0, side, t, "amax")
    ug, uslot = units // index.capacity, units % index.capacity
    sg, sc = torch.cat([pg, ug]), torch.cat([pc, uslot])
    index.count[sg, sc] = cnt
    index.centroid[sg, sc] = ksum / cnt.clamp(min=1)[:, None].float()
    index.sumsq[sg, sc] = ksq
    index.t_min[sg, sc], index.t_max[sg, sc] = tmin, tmax
    index.slabs[sg, sc] = torch.cat([parent_slabs, unit_slabs])
    index.split_flag[sg, sc] = False
    if index.bounded:
        sd = side[:, None].expand(-1, D)
        lo = torch.full((n_sides, D), _INF, device=dev).scatter_reduce_(0, sd, keys, "amin")
        hi = torch.full((n_sides, D), -_INF, device=dev).scatter_reduce_(0, sd, keys, "amax")
        empty = (cnt == 0)[:, None]
        index.kmin[sg, sc] = lo.masked_fill(empty, 0)
        index.kmax[sg, sc] = hi.masked_fill(empty, 0)
    index.num_clusters += units_per_group
    # the units' exact keys, a row per entry (groups with fewer entries padded with slot -1)
    width = int(per_group.max())
    ex_keys = torch.zeros(G, width, D, dtype=index.layout.dtype, device=dev)
    ex_slot = torch.full((G, width), -1, dtype=torch.int64, device=dev)
    ex_keys[g, rank] = got["k"][pinv, m].to(index.layout.dtype)
    ex_slot[g, rank] = slot
    index.add_exact(ex_keys, ex_slot, compact=True)
    index.coactivated += per_group
    index.flag_for_split(pg * index.capacity + pc, index.thresholds())  # a parent may now be cohesive
    if freed.numel():
        index.pool.free(freed)
    return int(g.numel())
