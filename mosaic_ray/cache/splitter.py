"""Deferred splitting of a ClusterIndex's clusters: bounded batches of 2-means, off the query path.

A flagged cluster (above split_size, or above its group's tau) is split in two: the parent keeps
its first slabs and the members of one side, the child gets new slabs and the other side. The
members are rewritten with one pool write and both children's statistics are recomputed exactly
from the members; children that still violate are flagged for a later call.

The splitter works through `ClusterIndex`'s public verbs (`member_rows`, `ensure_capacity`,
`store_clusters`, `flag_for_split`); the index does not know the splitter (callers drain with
`drain_splits(index)`).
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.cluster_index import ClusterIndex
from mosaic_ray.cache.gather import gather

_INF = float("inf")


def drain_splits(index: ClusterIndex, max_clusters: int | None = None) -> int:
    """Split up to `max_clusters` (default: config.split_batch) flagged clusters; returns splits done.

    Call between engine steps. Each split rewrites the parent's members into its own slabs
    and one child's new slabs; children that still violate are flagged for a later call.
    """
    if index.querying:
        raise RuntimeError("drain_splits called while a query holds the cluster index")
    limit = index.config.split_batch if max_clusters is None else max_clusters
    if limit <= 0:
        return 0
    flagged = index.split_flag.nonzero()
    if flagged.numel() == 0:
        index.refresh_flags()
        flagged = index.split_flag.nonzero()
        if flagged.numel() == 0:
            return 0
    flagged = flagged[:limit]
    g, c = flagged[:, 0], flagged[:, 1]  # g ascending (nonzero's order)
    rows, valid = index.member_rows(g, c)
    m, M = rows.shape
    # the members, on the index's device (a GPU reads them from the pinned pool in place)
    got = gather(index.pool, rows, index.device, "kv")
    keys = got["k"].float()
    labels = two_means(keys, valid, index.config.split_iters)
    n1 = (labels & valid).sum(1)
    n0 = valid.sum(1) - n1
    # children: label 0 stays in slot c, label 1 goes to a new slot of group g
    slabs_needed0 = -(-n0 // index.S)
    slabs_needed1 = -(-n1 // index.S)
    G = index.layout.groups
    per_group_new = torch.zeros(G, dtype=torch.int64, device=index.device).index_add_(0, g, torch.ones_like(g))
    offsets = torch.arange(m, device=index.device) - torch.searchsorted(g, g)  # rank of each split in its group
    n_new_slabs, clusters_after = torch.stack([slabs_needed1.sum(), (index.num_clusters + per_group_new).max()]).tolist()
    new_slabs = index.pool.allocate(n_new_slabs, index.owner).to(index.device)
    index.ensure_capacity(clusters_after)
    child = index.num_clusters[g] + offsets
    index.num_clusters += per_group_new
    tau = index.thresholds()
    dev, S, R = index.device, index.S, index.max_slabs
    # slab tables of the two children: the parent keeps its first slabs, the child gets new ones
    j = torch.arange(R, device=dev)[None, :]
    old_slabs = index.slabs[g, c]
    parent = torch.where(j < slabs_needed0[:, None], old_slabs, -1)
    split_at = torch.cumsum(slabs_needed1, 0) - slabs_needed1
    take = (split_at[:, None] + j).clamp(max=max(0, new_slabs.numel() - 1))
    child_slabs = torch.where(j < slabs_needed1[:, None], new_slabs[take] if new_slabs.numel() else -1, -1)
    freed = old_slabs[(j >= slabs_needed0[:, None]) & (old_slabs >= 0)]
    # destination row of every member: rank within its child, in (time) order
    lab = labels & valid
    rank = torch.where(lab, torch.cumsum(lab.long(), 1) - 1, torch.cumsum((~lab & valid).long(), 1) - 1)
    table = torch.where(lab[..., None], child_slabs[:, None, :], parent[:, None, :])  # [m, M, R]
    slab_of = table.gather(2, (rank // S).clamp(min=0)[..., None]).squeeze(-1)
    members = valid.flatten().nonzero().squeeze(1)  # one sync lists every member of every split
    flat = lambda t: t.flatten(0, 1).index_select(0, members)  # noqa: E731  [m, M, ...] -> [members, ...]
    dst = flat(slab_of * S + rank % S)
    index.pool.write(dst, flat(got["k"]), flat(got["v"]), flat(got["order"]), flat(got["time"]), flat(got["pos"]))
    # exact statistics of both children from their members
    side = flat(torch.arange(m, device=dev)[:, None] * 2 + lab.long())
    kf = flat(keys)
    cnt = torch.zeros(2 * m, dtype=torch.int64, device=dev).index_add_(0, side, torch.ones_like(side))
    ksum = torch.zeros(2 * m, kf.shape[1], device=dev).index_add_(0, side, kf)
    ksq = torch.zeros(2 * m, device=dev).index_add_(0, side, (kf * kf).sum(1))
    t = flat(got["time"])
    tmin = torch.full((2 * m,), _INF, device=dev).scatter_reduce_(0, side, t, "amin")
    tmax = torch.full((2 * m,), -_INF, device=dev).scatter_reduce_(0, side, t, "amax")
    if index.bounded:  # both children's key bounds, from their members
        sd = side[:, None].expand(-1, kf.shape[1])
        kmin = torch.full((2 * m, kf.shape[1]), _INF, device=dev).scatter_reduce_(0, sd, kf, "amin")
        kmax = torch.full((2 * m, kf.shape[1]), -_INF, device=dev).scatter_reduce_(0, sd, kf, "amax")
    for half, slot, slabs in ((0, c, parent), (1, child, child_slabs)):
        ii = torch.arange(m, device=dev) * 2 + half
        bounds = (kmin[ii], kmax[ii]) if index.bounded else (None, None)
        index.store_clusters(g, slot, slabs, cnt[ii], ksum[ii] / cnt[ii].clamp(min=1)[:, None].float(),
                             ksq[ii], tmin[ii], tmax[ii], *bounds)
    index.split_flag[g, c] = False
    for slot in (c, child):
        index.flag_for_split(g * index.capacity + slot, tau)
    if freed.numel():
        index.pool.free(freed)
    return m


def two_means(keys: torch.Tensor, valid: torch.Tensor, iters: int) -> torch.Tensor:
    """Batched 2-means: keys [m, M, D], valid [m, M] -> labels [m, M] bool (True = second child).

    Seeds are the member farthest from the mean and the member farthest from that one. A
    degenerate split (all members on one side, e.g. identical keys) falls back to halves in
    time order, so an oversized cluster always shrinks.
    """
    m, M, _ = keys.shape
    vf = valid.float()
    mean = (keys * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp(min=1)
    far = lambda p: ((keys - p[:, None]) ** 2).sum(-1).masked_fill(~valid, -1).argmax(1)  # noqa: E731
    ar = torch.arange(m, device=keys.device)
    a = keys[ar, far(mean)]
    b = keys[ar, far(a)]
    labels = torch.zeros(m, M, dtype=torch.bool, device=keys.device)
    for _ in range(iters):
        da = ((keys - a[:, None]) ** 2).sum(-1)
        db = ((keys - b[:, None]) ** 2).sum(-1)
        labels = (db < da) & valid
        w1 = labels.float()
        w0 = (~labels & valid).float()
        a = (keys * w0[..., None]).sum(1) / w0.sum(1, keepdim=True).clamp(min=1)
        b = (keys * w1[..., None]).sum(1) / w1.sum(1, keepdim=True).clamp(min=1)
    n1 = labels.sum(1)
    n = valid.sum(1)
    degenerate = (n1 == 0) | (n1 == n)  # (no host test of it: the fallback costs less than a sync)
    r = torch.arange(M, device=keys.device)[None, :]
    halves = (r >= (n // 2)[:, None]) & valid
    labels = torch.where(degenerate[:, None], halves, labels)
    return labels
