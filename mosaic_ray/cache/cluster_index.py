"""ClusterIndex: one stream's cross-modal clusters, per (layer, KV head) group, on the compute device.

Per cluster (slot `c` of group `g`) the index keeps, on the device:
    count[g, c]            members (0 = unused slot)
    centroid[g, c, :]      mean key (fp32); the running sum is centroid x count
    sumsq[g, c]            sum of squared member norms, so variance = sumsq/count - |centroid|^2 in O(1)
    t_min/t_max[g, c]      time span of the members (seconds)
    slabs[g, c, :]         the host-pool slabs holding the members, in member order (-1 = none)
Members of a cluster are rows 0..count-1 of its slab list, in arrival (= time) order, so a cluster is
`ceil(count / slab_tokens)` contiguous runs in the pool.

Assignment (`insert`) is batched over all groups and tokens: a token joins its nearest centroid if
the cluster's variance after joining stays <= tau[g] (variance_ratio x the running key variance of
the group) and the cluster has room (< max_size, counting tokens of the same batch); the rest are
clustered among themselves by parallel leader clustering (seeds, and tokens within tau of a seed:
`cache/seeding.py`). Clusters that end up larger than
split_size or above tau are flagged; `splitter.drain_splits` splits them by 2-means in bounded
batches, through the index's public verbs (`ensure_capacity`, `store_clusters`, `flag_for_split`).

Text segments (a caption, a Q/A turn: `TokenBatch.text`) are units of their own, not clustered by
key distance: each is one cluster (or one per max_size of its tokens) that no frame token joins
and no split touches, and the index keeps its tokens' exact keys on the device (`text_keys`,
`text_slot`), so a question can score it by its best token (`ClusterRetriever`). Text and video
units then compete for one budget (issue 19: a caption blurred into video clusters is lost).

Invariants (tested): every inserted token is in exactly one cluster; centroid == mean of members;
count <= max_size always; after `drain_splits(index)` runs dry every video cluster has count <= split_size
and variance <= tau (text units are never split). `insert` is all-or-nothing: when the pool cannot take the rows it raises
PoolExhaustedError and the index is unchanged. Splits never run while a query holds the index
(`querying` guard).

Verbs: insert / pending_splits / member_rows / ensure_capacity / store_clusters / flag_for_split /
release.
"""

from __future__ import annotations

import contextlib
import torch

from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.seeding import seed_unassigned
from mosaic_ray.cache.token_batch import TokenBatch, ranks_within
from mosaic_ray.config import ClusterConfig, KVLayout

_INF = float("inf")


class ClusterIndex:
    def __init__(
        self,
        layout: KVLayout,
        config: ClusterConfig,
        pool: HostPool,
        owner: int,
        device: torch.device | str = "cpu",
        initial_capacity: int = 64,
    ) -> None:
        self.layout, self.config, self.pool, self.owner = layout, config, pool, owner
        self.device = torch.device(device)
        self.S = pool.slab_tokens
        self.max_slabs = -(-config.max_size // self.S)
        G, D = layout.groups, layout.head_dim
        self.num_clusters = torch.zeros(G, dtype=torch.int64, device=self.device)
        self._alloc(initial_capacity)
        # Running key statistics per group: the scale the cohesion threshold adapts to.
        self.key_count = torch.zeros(G, dtype=torch.float64, device=self.device)
        self.key_sum = torch.zeros(G, D, dtype=torch.float64, device=self.device)
        self.key_sumsq = torch.zeros(G, dtype=torch.float64, device=self.device)
        self._no_text()
        self.querying = 0

    def _no_text(self) -> None:
        # Exact units' tokens (text segments, co-activation units): exact keys [G, t, D] and the
        # cluster slot of each [G, t]; -1 pads a group with fewer of them (its key row is 0)
        G, D = self.layout.groups, self.layout.head_dim
        self.text_keys = torch.empty(G, 0, D, dtype=self.layout.dtype, device=self.device)
        self.text_slot = torch.empty(G, 0, dtype=torch.int64, device=self.device)
        # what questions attended, waiting for `regroup` (cache/coactivation.py): (g, c, member, weight)
        self.attended: list[tuple[torch.Tensor, ...]] = []
        # tokens per group that co-activation made exact (bounded by `coactivation_max_share`)
        self.coactivated = torch.zeros(G, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ storage
    def _alloc(self, capacity: int) -> None:
        G, D, dev = self.layout.groups, self.layout.head_dim, self.device
        self.capacity = capacity
        self.count = torch.zeros(G, capacity, dtype=torch.int64, device=dev)
        self.centroid = torch.zeros(G, capacity, D, dtype=torch.float32, device=dev)
        self.sumsq = torch.zeros(G, capacity, dtype=torch.float32, device=dev)
        self.t_min = torch.full((G, capacity), _INF, dtype=torch.float32, device=dev)
        self.t_max = torch.full((G, capacity), -_INF, dtype=torch.float32, device=dev)
        self.slabs = torch.full((G, capacity, self.max_slabs), -1, dtype=torch.int64, device=dev)
        self.split_flag = torch.zeros(G, capacity, dtype=torch.bool, device=dev)
        # per-dimension min / max of the members' keys (representative "bound"; 0 for empty slots)
        bound_cap = capacity if self.config.representative == "bound" else 0
        self.kmin = torch.zeros(G, bound_cap, D, dtype=torch.float32, device=dev)
        self.kmax = torch.zeros(G, bound_cap, D, dtype=torch.float32, device=dev)

    def ensure_capacity(self, needed: int) -> None:
        """Room for `needed` cluster slots per group (the slots' contents kept)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        old = self._per_cluster()
        self._alloc(new_cap)
        for dst, src in zip(self._per_cluster(), old):
            dst[:, : src.shape[1]] = src

    def _per_cluster(self) -> tuple[torch.Tensor, ...]:
        return (self.count, self.centroid, self.sumsq, self.t_min, self.t_max, self.slabs, self.split_flag,
                self.kmin, self.kmax)

    @property
    def bounded(self) -> bool:
        """Per-cluster key bounds are kept (`ClusterConfig.representative == "bound"`)."""
        return self.kmin.shape[1] == self.capacity and self.config.representative == "bound"

    def restore_bounds(self) -> None:
        """After importing a snapshot without key bounds: each cluster's bound is its centroid
        (a point), until its next members or split widen it."""
        if self.config.representative == "bound" and self.kmin.shape[1] != self.capacity:
            self.kmin, self.kmax = self.centroid.clone(), self.centroid.clone()
        elif self.config.representative != "bound" and self.kmin.shape[1]:  # bounds this engine does not use
            G, D = self.layout.groups, self.layout.head_dim
            self.kmin = self.kmax = torch.zeros(G, 0, D, dtype=torch.float32, device=self.device)

    @property
    def total_clusters(self) -> int:
        return int(self.num_clusters.sum())

    def metadata_bytes(self) -> int:
        """Device bytes the clusters in use cost (what a query's scoring reads, plus bookkeeping)."""
        per_cluster = (
            self.centroid.element_size() * self.layout.head_dim
            + 8 + 4 + 4 + 4 + 8 * self.max_slabs + 1
        )
        if self.bounded:
            per_cluster += 2 * self.kmin.element_size() * self.layout.head_dim
        text = self.text_keys.numel() * self.text_keys.element_size() + self.text_slot.numel() * 8
        return self.total_clusters * per_cluster + text

    # ------------------------------------------------------------------ thresholds
    def thresholds(self) -> torch.Tensor:
        """tau[g] = variance_ratio x running variance of the group's keys (mean |k - mean k|^2)."""
        return self._tau_from(self.key_count, self.key_sum, self.key_sumsq)

    def variances(self, groups: slice = slice(None)) -> torch.Tensor:
        """Per-cluster variance (mean squared distance of members to the centroid) of `groups`, 0
        for empty slots."""
        count, mu = self.count[groups], self.centroid[groups]
        var = self.sumsq[groups] / count.clamp(min=1).float() - (mu * mu).sum(-1)
        return torch.where(count > 0, var.clamp(min=0), torch.zeros_like(var))

    # ------------------------------------------------------------------ assignment
    def _nearest(self, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest used cluster with room (count < max_size) per token: (d2 [G, n], idx [G, n]);
        d2 = inf when a group has none."""
        G, n, _ = x.shape
        C = max(1, int(self.num_clusters.max()))
        d2 = torch.full((G, n), _INF, device=self.device)
        idx = torch.zeros((G, n), dtype=torch.int64, device=self.device)
        step = max(1, self.config.distance_block_elems // max(1, n * C))
        used = torch.arange(C, device=self.device)[None, :] < self.num_clusters[:, None]
        used &= self.count[:, :C] < self.config.max_size  # a full cluster takes no member: the nearest with room
        used &= ~self.text_mask()[:, :C]  # nor does an exact unit's
        used &= self.count[:, :C] > 0  # a slot regrouping emptied is no cluster
        for g0 in range(0, G, step):
            g1 = min(G, g0 + step)
            mu = self.centroid[g0:g1, :C]
            dist = x2[g0:g1, :, None] - 2 * torch.bmm(x[g0:g1], mu.transpose(1, 2)) + (mu * mu).sum(-1)[:, None, :]
            dist = dist.clamp(min=0).masked_fill(~used[g0:g1, None, :], _INF)
            d2[g0:g1], idx[g0:g1] = dist.min(-1)
        return d2, idx

    def insert(self, batch: TokenBatch) -> torch.Tensor:
        """Assign a batch of tokens to clusters and store their K/V in the pool.

        Returns the cluster slot of every token, [G, n] int64. All-or-nothing (see module doc).
        """
        batch.check(self.layout)
        G, n, D = batch.keys.shape
        if n == 0:
            return torch.zeros(G, 0, dtype=torch.int64, device=self.device)
        x = batch.keys.to(self.device, torch.float32)
        x2 = (x * x).sum(-1)
        key_stats = (self.key_count + n, self.key_sum + x.sum(1).double(), self.key_sumsq + x2.sum(1).double())
        tau = self._tau_from(*key_stats)

        assign = torch.full((G, n), -1, dtype=torch.int64, device=self.device)
        base = self.num_clusters.clone()
        # 0) text segments are units of their own: pieces of up to max_size tokens, new clusters
        text_idx, piece_of, pieces = self._text_pieces(batch)
        if pieces:
            assign[:, text_idx] = base[:, None] + piece_of[None, :]
        video = ~batch.texts().to(self.device) if self.config.text_units else torch.ones(n, dtype=torch.bool, device=self.device)
        # 1) a frame's token joins an existing video cluster when cohesive and with room
        if self.total_clusters > 0:
            d2, j = self._nearest(x, x2)
            cnt = self.count.gather(1, j).float()
            var = self.variances().gather(1, j)
            new_var = cnt / (cnt + 1) * (var + d2 / (cnt + 1))
            ok = torch.isfinite(d2) & (new_var <= tau[:, None]) & video[None, :]
            assign = self._admit(assign, ok, j, self.count.gather(1, j))
        # 2) seed new clusters from what is left; tokens within tau of a seed join it
        new_per_group = pieces + seed_unassigned(self.config, assign, x, x2, tau, base + pieces)
        # 3) reserve pool rows (all-or-nothing), then commit
        member_rank = self._member_ranks(assign)
        slab_of, new_slab_keys = self._slab_needs(assign, member_rank, base + new_per_group)
        new_slabs = self.pool.allocate(int(new_slab_keys.numel()), self.owner)
        if pieces:  # their exact keys, on the device: a text unit scores by its best token
            self.add_exact(batch.keys[:, text_idx], assign[:, text_idx])  # before `_flag`: never split
        self._commit(batch, x, x2, assign, member_rank, slab_of, new_slab_keys, new_slabs, new_per_group, key_stats, tau)
        return assign

    def _text_pieces(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch's text tokens: (their indices [t], each one's piece [t], pieces). A piece is a
        run of at most max_size consecutive tokens of one text segment (block). One host sync when
        the batch says which tokens are text."""
        none = torch.zeros(0, dtype=torch.int64, device=self.device)
        if batch.text is None or not self.config.text_units:
            return none, none, 0
        idx = batch.text.to(self.device).nonzero().flatten()
        if idx.numel() == 0:
            return none, none, 0
        blocks = batch.blocks().to(self.device)[idx]
        i = torch.arange(idx.numel(), device=self.device)
        starts = torch.ones_like(blocks, dtype=torch.bool)
        starts[1:] = (blocks[1:] != blocks[:-1]) | (idx[1:] != idx[:-1] + 1)
        run_start = torch.where(starts, i, torch.zeros_like(i)).cummax(0).values
        new_piece = starts | ((i - run_start) % self.config.max_size == 0)
        piece_of = torch.cumsum(new_piece.long(), 0) - 1
        return idx, piece_of, int(piece_of[-1]) + 1

    def text_mask(self, groups: slice = slice(None)) -> torch.Tensor:
        """[g, capacity] True for the cluster slots of `groups` that hold an exact unit (a text
        segment's piece, or a co-activation unit)."""
        slot = self.text_slot[groups]
        mask = torch.zeros(slot.shape[0], self.capacity + 1, dtype=torch.bool, device=self.device)
        if slot.shape[1]:
            mask.scatter_(1, slot.masked_fill(slot < 0, self.capacity), True)
        return mask[:, : self.capacity].contiguous()

    def add_exact(self, keys: torch.Tensor, slot: torch.Tensor, compact: bool = False) -> None:
        """Append exact units' tokens: keys [G, t, D], their cluster slots [G, t] (-1: padding).
        `compact` (co-activation's units, a different count per group): every row's tokens are
        moved ahead of its padding and the columns no row uses dropped, so padding never builds
        up over calls (one host sync; a text segment's tokens, the same count in every group, are
        appended as they are, without one)."""
        keys = torch.cat([self.text_keys, keys.to(self.device, self.layout.dtype)], 1)
        slot = torch.cat([self.text_slot, slot.to(self.device)], 1)
        if compact:
            first = torch.argsort((slot < 0).to(torch.int8), dim=1, stable=True)
            width = int((slot >= 0).sum(1).max()) if slot.numel() else 0
            first = first[:, :width]
            slot = slot.gather(1, first)
            keys = keys.gather(1, first[..., None].expand(-1, -1, keys.shape[2]))
        self.text_keys, self.text_slot = keys.contiguous(), slot.contiguous()

    def _tau_from(self, count, ksum, ksumsq) -> torch.Tensor:
        n = count.clamp(min=1)
        mean = ksum / n[:, None]
        var = (ksumsq / n - (mean * mean).sum(-1)).clamp(min=0)
        return (self.config.variance_ratio * var).float()

    def _admit(self, assign, ok, j, cnt_before) -> torch.Tensor:
        """Accept ok tokens into cluster j while count + rank-in-batch < max_size."""
        G = assign.shape[0]
        key = torch.where(ok, torch.arange(G, device=self.device)[:, None] * (1 << 32) + j, -1)
        rank = ranks_within(key.flatten()).view_as(key)
        room = ok & (cnt_before + rank < self.config.max_size)
        return torch.where(room, j, assign)

    def _member_ranks(self, assign) -> torch.Tensor:
        """Index of each new token among its cluster's members (existing count + rank in batch)."""
        G = assign.shape[0]
        key = torch.arange(G, device=self.device)[:, None] * (1 << 32) + assign
        rank = ranks_within(key.flatten()).view_as(key)
        existing = assign < self.capacity  # (no boolean-mask write: it would sync with the host)
        old = torch.where(existing, self.count.gather(1, assign.clamp(max=self.capacity - 1)), 0)
        return old + rank

    def _slab_needs(self, assign, member_rank, clusters_after):
        """Which (group, cluster, slab-number) need a new slab; returns (slab_no [G,n], keys [m])."""
        self.ensure_capacity(int(clusters_after.max()))
        slab_no = member_rank // self.S
        G = assign.shape[0]
        gi = torch.arange(G, device=self.device)[:, None].expand_as(assign)
        have = self.slabs[gi, assign, slab_no] >= 0
        flat = (gi * self.capacity + assign) * self.max_slabs + slab_no
        return slab_no, torch.unique(flat[~have])

    def _commit(self, batch, x, x2, assign, member_rank, slab_no, new_keys, new_slabs, new_per_group, key_stats, tau):
        G, n, D = x.shape
        self.slabs.view(-1)[new_keys] = new_slabs.to(self.device)
        gi = torch.arange(G, device=self.device)[:, None].expand_as(assign)
        slab = self.slabs[gi, assign, slab_no]
        rows = slab * self.S + member_rank % self.S
        order = batch.order[None, :].expand(G, n)
        time = batch.time[None, :].expand(G, n)
        pos = batch.pos[None, :, :].expand(G, n, batch.pos.shape[1])
        self.pool.write(
            rows.flatten(), batch.keys.reshape(G * n, D), batch.values.reshape(G * n, D),
            order.flatten(), time.flatten(), pos.reshape(G * n, -1),
        )
        # statistics of the touched clusters only: running sum = centroid x count
        flat = (gi * self.capacity + assign).flatten()
        touched, inv = torch.unique(flat, return_inverse=True)
        joined = torch.zeros(touched.numel(), dtype=self.count.dtype, device=self.device)
        cnt = self.count.view(-1)[touched] + joined.index_add_(0, inv, torch.ones_like(inv, dtype=joined.dtype))
        sums = self.centroid.view(-1, D)[touched] * self.count.view(-1)[touched, None].float()
        sums.index_add_(0, inv, x.reshape(-1, D))
        self.sumsq.view(-1)[touched] = self.sumsq.view(-1)[touched].index_add(0, inv, x2.flatten())
        if self.bounded:  # per-dimension min / max of the members, the batch's folded in
            was_empty = (self.count.view(-1)[touched] == 0)[:, None]
            idx = inv[:, None].expand(-1, D)
            lo = torch.full((touched.numel(), D), _INF, device=self.device).scatter_reduce_(0, idx, x.reshape(-1, D), "amin")
            hi = torch.full((touched.numel(), D), -_INF, device=self.device).scatter_reduce_(0, idx, x.reshape(-1, D), "amax")
            self.kmin.view(-1, D)[touched] = torch.where(was_empty, lo, torch.minimum(self.kmin.view(-1, D)[touched], lo))
            self.kmax.view(-1, D)[touched] = torch.where(was_empty, hi, torch.maximum(self.kmax.view(-1, D)[touched], hi))
        self.count.view(-1)[touched] = cnt
        self.centroid.view(-1, D)[touched] = sums / cnt[:, None].float()
        tdev = batch.time.to(self.device, torch.float32)[None, :].expand(G, n).flatten()
        self.t_min.view(-1).scatter_reduce_(0, flat, tdev, "amin")
        self.t_max.view(-1).scatter_reduce_(0, flat, tdev, "amax")
        self.num_clusters += new_per_group
        self.key_count, self.key_sum, self.key_sumsq = key_stats
        self.flag_for_split(touched, tau)

    def flag_for_split(self, flat_slots: torch.Tensor, tau: torch.Tensor) -> None:
        """(Re)evaluate clusters: flag those above split_size or tau for a deferred split."""
        g = flat_slots // self.capacity
        cnt = self.count.view(-1)[flat_slots]
        mu = self.centroid.view(-1, self.layout.head_dim)[flat_slots]
        var = (self.sumsq.view(-1)[flat_slots] / cnt.clamp(min=1).float() - (mu * mu).sum(-1)).clamp(min=0)
        bad = (cnt > self.config.split_size) | ((var > tau[g]) & (cnt > 1))
        self.split_flag.view(-1)[flat_slots] = bad & ~self.text_mask().view(-1)[flat_slots]  # text is never split

    def refresh_flags(self) -> None:
        """Re-check every cluster against the current thresholds (they drift as keys arrive)."""
        used = torch.arange(self.capacity, device=self.device)[None, :] < self.num_clusters[:, None]
        self.flag_for_split(used.flatten().nonzero().flatten(), self.thresholds())

    # ------------------------------------------------------------------ members
    def member_rows(self, g: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows of clusters (g[i], c[i]): ([m, max_size] rows, [m, max_size] valid mask)."""
        cnt = self.count[g, c]
        r = torch.arange(self.config.max_size, device=self.device)
        slab = self.slabs[g, c][:, (r // self.S)]
        rows = slab * self.S + (r % self.S)[None, :]
        valid = r[None, :] < cnt[:, None]
        return torch.where(valid, rows, -1), valid

    # ------------------------------------------------------------------ deferred split
    @contextlib.contextmanager
    def query_guard(self):
        """Held by retrieval: splits refuse to run while any query reads the index."""
        self.querying += 1
        try:
            yield
        finally:
            self.querying -= 1

    def pending_splits(self) -> int:
        return int(self.split_flag.sum())

    def store_clusters(self, g: torch.Tensor, c: torch.Tensor, slabs: torch.Tensor, count: torch.Tensor,
                       centroid: torch.Tensor, sumsq: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor,
                       kmin: torch.Tensor | None = None, kmax: torch.Tensor | None = None) -> None:
        """Replace clusters (g[i], c[i]) whole: their slab tables and their members' statistics
        (count, mean key, sum of squared norms, time span; key bounds when the index keeps them).
        The caller has written the members to those slabs; split flags are left to `flag_for_split`."""
        if self.bounded:
            self.kmin[g, c] = kmin
            self.kmax[g, c] = kmax
        self.slabs[g, c] = slabs
        self.count[g, c] = count
        self.centroid[g, c] = centroid
        self.sumsq[g, c] = sumsq
        self.t_min[g, c] = t_min
        self.t_max[g, c] = t_max

    # ------------------------------------------------------------------ lifetime
    def release(self) -> int:
        """Free every slab of this stream; the index is empty afterwards."""
        freed = self.pool.release_owner(self.owner)
        self.num_clusters.zero_()
        self._alloc(self.capacity)
        self._no_text()
        return freed
