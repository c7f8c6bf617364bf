"""In-batch seeding of a cluster insert: the tokens no existing cluster took form new clusters
among themselves, by parallel leader clustering (`seed_unassigned`; `ClusterIndex.insert` step 2).

Pure tensor functions of the batch and the index's config: they read and write the batch's
assignment only, never the index.
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.token_batch import ranks_within
from mosaic_ray.config import ClusterConfig


def seed_unassigned(config: ClusterConfig, assign, x, x2, tau, base) -> torch.Tensor:
    """Seed new clusters from the tokens no cluster could take; returns new clusters per group.

    Parallel leader clustering, a few rounds: an unassigned token with no earlier unassigned
    token within `radius` becomes a seed; every other unassigned token joins its nearest seed
    within `radius`, max_size per cluster (a seed with more joiners makes several clusters,
    so a dense batch needs one round, not one per max_size tokens). A member within `radius`
    of its seed keeps the cluster's variance <= radius (variance about the mean <= mean
    squared distance to any point). Each round seeds at least the earliest unassigned token,
    so it ends; after `seed_rounds` the radius widens so the work per batch stays bounded
    (those clusters are flagged for a split if needed).

    Cost is quadratic in the tokens seeded together, so only the unassigned tokens take part
    (compacted, in arrival order: one host sync for their largest count), and they are seeded
    in runs of `seed_chunk` consecutive tokens, each run on its own (a run is one row of the
    seeding problem, like a group). Rows are seeded in blocks of `distance_block_elems`
    distances, each block's distances computed once for all its rounds. Mutates `assign`.
    """
    G, n, D = x.shape
    dev = x.device
    new_per_group = torch.zeros(G, dtype=torch.int64, device=dev)
    un = assign < 0
    left = un.sum(1)
    m = int(left.max())  # the one host sync of the compaction
    if m == 0:
        return new_per_group
    c = min(m, config.seed_chunk or m)
    k = -(-m // c)  # runs per group
    # unassigned tokens first, in arrival order; columns past a group's count are padding
    order = torch.argsort((~un).to(torch.uint8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=dev)[None, :] < left[:, None]
    # padded to whole runs (the padding points at token 0 and takes no part)
    order_p = torch.cat([order, order.new_zeros(G, k * c - m)], 1)
    valid_p = torch.cat([valid, valid.new_zeros(G, k * c - m)], 1)
    xs = x.gather(1, order_p[..., None].expand(G, k * c, D)).view(G * k, c, D)
    x2s = x2.gather(1, order_p).view(G * k, c)
    local = torch.where(valid_p, -1, -2).view(G * k, c)  # -1: to seed, -2: padding (takes no part)
    made = _seed_rows(config, local, xs, x2s, tau.repeat_interleave(k)).view(G, k)
    # local cluster ids -> slots: after the group's existing clusters and its earlier runs
    first = (base[:, None] + torch.cumsum(made, 1) - made).view(G * k, 1)
    slot = (local + first).view(G, k * c)[:, :m]
    assign.scatter_(1, order, torch.where(valid, slot, assign.gather(1, order)))
    return made.sum(1)

def _seed_rows(config: ClusterConfig, a, x, x2, radius) -> torch.Tensor:
    """Leader clustering of each row of `a` [R, c] (-1 = to seed, -2 = padding) on its own:
    writes row-local cluster ids (0, 1, ...) into `a`; returns clusters made per row."""
    R, c = a.shape
    dev = a.device
    made = torch.zeros(R, dtype=torch.int64, device=dev)
    earlier = torch.tril(torch.ones(c, c, dtype=torch.bool, device=dev), diagonal=-1)  # [i, j]: j < i
    step = max(1, config.distance_block_elems // max(1, c * c))
    for r0 in range(0, R, step):  # rows are independent: each block runs its own rounds
        r1 = min(R, r0 + step)
        ab, r = a[r0:r1], radius[r0:r1]  # a view: rounds write `a` in place
        d2 = (x2[r0:r1, :, None] - 2 * torch.bmm(x[r0:r1], x[r0:r1].transpose(1, 2)) + x2[r0:r1, None, :]).clamp(min=0)
        close = d2 <= r[:, None, None]  # distances once per block, not once per round
        close_earlier = close & earlier[None]
        rounds = 0
        while True:
            un = ab == -1
            # a host sync per check: the first round goes without one (with no token left it
            # changes nothing: no seed, no joiner)
            if rounds and not bool(un.any()):
                break
            covered = (close_earlier & un[:, None, :]).any(-1)
            seed = un & ~covered
            best, near = d2.masked_fill(~(seed[:, None, :] & close), float("inf")).min(-1)
            near = torch.where(torch.isfinite(best), near, -1)
            made[r0:r1] += _take_seeds(config, ab, seed, un, near, made[r0:r1])
            rounds += 1
            if rounds >= config.seed_rounds:
                r = torch.where(r > 0, r * 4, torch.full_like(r, 1e-6))
                close = d2 <= r[:, None, None]
                close_earlier = close & earlier[None]
    return made

def _take_seeds(config: ClusterConfig, a, seed, un, near, first_free) -> torch.Tensor:
    """One seeding round of a block of rows: seeds become clusters and the tokens whose
    nearest seed (within radius) they are join them, max_size members per cluster (the
    joiners beyond the first max_size - 1 fill further clusters of that seed in arrival order:
    each member is within radius of the seed point, so each cluster's variance stays <=
    radius). Writes `a` (the block's assignment) in place; returns clusters made per row."""
    Gb, n = a.shape
    joins = un & ~seed & (near >= 0)
    gi = torch.arange(Gb, device=a.device)[:, None]
    rank = ranks_within(torch.where(joins, gi * (1 << 32) + near, -1).flatten()).view(Gb, n)
    chunk = torch.where(joins, (rank + 1) // config.max_size, 0)
    extra = torch.zeros(Gb, n, dtype=torch.int64, device=a.device).scatter_reduce_(1, near.clamp(min=0), chunk, "amax")
    made = torch.where(seed, extra + 1, 0)  # clusters each seed makes
    first = first_free[:, None] + torch.cumsum(made, 1) - made  # its first slot
    a[:] = torch.where(seed, first, a)
    a[:] = torch.where(joins, first.gather(1, near.clamp(min=0)) + chunk, a)
    return made.sum(1)
