"""gather_clusters: a question's best clusters, member by member, from the host pool straight into
its retrieved slots of the device KV pool, in one launch per layer.

Input is a selection in *score order*, as `cache.selection.prefix_positions` makes it: per KV head
h the clusters sorted best-first (`order[h]`), their sizes in that order (`sizes[h]`) and the
running total (`csum[h]`). The clusters taken are the longest prefix whose total is <= budget; the
taken members are laid out back to back, cluster by cluster, member by member: output position p
of head h is member `p - (csum[k] - sizes[k])` of cluster `order[k]`, k = the first index with
csum[k] > p, for p below the taken total. A member m of cluster c is row m % S of slab
`slabs[c, m // S]` of the pool (ClusterIndex's layout), so members of one slab are one contiguous
read.

One program moves BLOCK_P positions of one head: it finds each position's cluster by a binary
search over csum (no host sync, no compaction pass), loads the K and V rows from the pinned pool in
place (UVA, see uva.py) and stores them at `out[slots[p], h]`, with `valid[slots[p], h]` = (p below
the taken total); positions past it are zero-filled and invalid. Counters for the question
(tokens moved, slab reads) are added to `counts` on the device.

The torch reference is the same computation with `torch.searchsorted` + indexing (the CPU path);
both give the same bits.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton

OP = "gather_clusters"
BLOCK_P = 32
NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _first_above(row_ptr, x, C, steps):
        # per lane: the first index k in [0, C] with row[k] > x (row non-decreasing): searchsorted right
        lo = x * 0
        hi = lo + C
        for _ in range(steps):
            mid = (lo + hi) // 2
            v = tl.load(row_ptr + mid, mask=mid < hi, other=0)
            go = (mid < hi) & (v <= x)
            lo = tl.where(go, mid + 1, lo)
            hi = tl.where(go | (mid >= hi), hi, mid)
        return lo

    @triton.jit(do_not_specialize=["C", "W", "budget", "steps"])
    def _gather_clusters_kernel(
        pool_ptr, order_ptr, sizes_ptr, csum_ptr, slabs_ptr, slots_ptr,
        out_k_ptr, out_v_ptr, valid_ptr, counts_ptr,
        C, W, budget, steps, D,
        stride_pool_slab, stride_pool_kv, stride_pool_tok,
        stride_sel_h,  # order / sizes / csum are [H, C] contiguous rows
        stride_slab_h, stride_slab_c,
        stride_out_slot, stride_out_h, stride_valid_slot,
        S: tl.constexpr, MAX_SLABS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        csum_row = csum_ptr + h * stride_sel_h
        # the taken total: the largest csum <= budget (csum is non-decreasing)
        n_fit = _first_above(csum_row, tl.zeros([1], dtype=tl.int64) + budget, C, steps)
        total = tl.load(csum_row + tl.maximum(n_fit - 1, 0), mask=n_fit > 0, other=0)

        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        in_p = offs_p < W
        p = offs_p.to(tl.int64)
        # each position's cluster: the first k with csum[k] > p
        valid = in_p & (p < total)
        k = tl.minimum(_first_above(csum_row, p, C, steps), C - 1)
        z = tl.load(sizes_ptr + h * stride_sel_h + k, mask=valid, other=0).to(tl.int64)
        c = tl.load(csum_row + k, mask=valid, other=0)
        unit = tl.load(order_ptr + h * stride_sel_h + k, mask=valid, other=0).to(tl.int64)
        member = p - (c - z)
        j = member // S
        r = member - j * S
        slab = tl.load(slabs_ptr + h * stride_slab_h + unit * stride_slab_c + tl.minimum(j, MAX_SLABS - 1),
                       mask=valid, other=0).to(tl.int64)
        src = slab * stride_pool_slab + r * stride_pool_tok
        dst = tl.load(slots_ptr + offs_p, mask=in_p, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        lmask = valid[:, None] & in_d[None, :]
        smask = in_p[:, None] & in_d[None, :]
        out_off = dst[:, None] * stride_out_slot + h * stride_out_h + offs_d[None, :]
        kk = tl.load(pool_ptr + src[:, None] + offs_d[None, :], mask=lmask, other=0.0)
        tl.store(out_k_ptr + out_off, kk, mask=smask)
        vv = tl.load(pool_ptr + stride_pool_kv + src[:, None] + offs_d[None, :], mask=lmask, other=0.0)
        tl.store(out_v_ptr + out_off, vv, mask=smask)
        tl.store(valid_ptr + dst * stride_valid_slot + h, valid.to(tl.int8), mask=in_p)
        n = tl.sum(valid.to(tl.int64), axis=0)
        reads = tl.sum((valid & (r == 0)).to(tl.int64), axis=0)
        tl.atomic_add(counts_ptr, n)
        tl.atomic_add(counts_ptr + 1, reads)
        tl.atomic_add(counts_ptr + 2, n)


def cluster_positions(order: torch.Tensor, sizes: torch.Tensor, csum: torch.Tensor, slabs: torch.Tensor,
                      budget: int, width: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference layout: (rows [H, W] pool rows, -1 past the taken total; slab_start [H, W]
    True where a position begins a slab read)."""
    H, C = order.shape
    dev = order.device
    p = torch.arange(width, device=dev)[None].expand(H, width).contiguous()
    if C == 0 or width == 0:
        return torch.full((H, width), -1, dtype=torch.int64, device=dev), torch.zeros(H, width, dtype=torch.bool, device=dev)
    fits = csum <= budget
    total = torch.where(fits, csum, 0).amax(1, keepdim=True)
    k = torch.searchsorted(csum, p, right=True).clamp(max=C - 1)
    member = p - (csum.gather(1, k) - sizes.gather(1, k))
    unit = order.gather(1, k)
    heads = torch.arange(H, device=dev)[:, None]
    slab = slabs[heads, unit, (member // S).clamp(min=0, max=slabs.shape[-1] - 1)]
    valid = p < total
    rows = torch.where(valid, slab * S + member % S, -1)
    return rows, valid & (member % S == 0)


def gather_clusters_reference(pool_kv, order, sizes, csum, slabs, budget, slots, out_k, out_v, out_valid, counts) -> None:
    from mosaic_ray.kernels.gather_rows import gather_rows_reference

    S = pool_kv.shape[2]
    rows, starts = cluster_positions(order, sizes, csum, slabs, budget, slots.numel(), S)
    gather_rows_reference(pool_kv, rows, "kv", out_k, out_v, out_slots=slots, out_valid=out_valid)
    n = (rows >= 0).sum()
    counts[:3] += torch.stack([n, starts.sum(), n]).to(counts.device)


def gather_clusters(pool_kv: torch.Tensor, order: torch.Tensor, sizes: torch.Tensor, csum: torch.Tensor,
                    slabs: torch.Tensor, budget: int, slots: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor,
                    out_valid: torch.Tensor, counts: torch.Tensor, *, backend: str = "auto") -> None:
    """Move the taken members of a score-ordered selection into `slots` of a device-pool layer.

    pool_kv [N, 2, S, D] (pinned host, or on the device); order / sizes / csum [H, C] int64 (score
    order, sizes and running total; contiguous rows); slabs [H, C', MAX_SLABS] int64 (the layer's
    slab table, C' >= C); slots [W]; out_k / out_v [Nslots, H, D]; out_valid [Nslots, H] bool;
    counts [>= 3] int64 gets += (tokens, slab reads, rows read). Asynchronous, no host sync."""
    H, C = order.shape
    W = slots.numel()
    if not (order.stride() == sizes.stride() == csum.stride() and (C <= 1 or order.stride(1) == 1)):
        raise ValueError(f"{OP}: order, sizes and csum must be contiguous [H, C] alike")
    if out_k.stride() != out_v.stride() or out_k.stride(2) != 1 or out_valid.stride(1) != 1:
        raise ValueError(f"{OP}: out_k / out_v must be pool layers [N, H, D] of equal strides, out_valid [N, H]")
    if _backend.choose(OP, backend, out_k) == "torch":
        return gather_clusters_reference(pool_kv, order, sizes, csum, slabs, budget, slots, out_k, out_v, out_valid, counts)
    if H == 0 or W == 0 or C == 0:
        if W:
            out_valid.index_fill_(0, slots, False)
        return None
    D = pool_kv.shape[3]
    with torch.cuda.device(out_k.device) if out_k.is_cuda else nullcontext():
        _gather_clusters_kernel[(triton.cdiv(W, BLOCK_P), H)](
            pool_kv, order, sizes, csum, slabs, slots, out_k, out_v, out_valid.view(torch.int8), counts,
            C, W, int(budget), max(1, int(C).bit_length()), D,
            pool_kv.stride(0), pool_kv.stride(1), pool_kv.stride(2),
            order.stride(0), slabs.stride(0), slabs.stride(1),
            out_k.stride(0), out_k.stride(1), out_valid.stride(0),
            S=pool_kv.shape[2], MAX_SLABS=slabs.shape[-1], BLOCK_P=BLOCK_P,
            BLOCK_D=_backend.next_power_of_2(D), num_warps=NUM_WARPS,
        )
    return None
