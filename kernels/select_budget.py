"""select_budget: take clusters best-first while their summed size fits a token budget.

For each group g: order clusters by score (descending; ties by lower index, as a stable sort), and
take the longest prefix of that order whose cumulative size is <= budget. Slots scored -inf or NaN
(padding, see score_centroids) are never taken. Sizes must be >= 0.

Why a kernel: the torch version is sort + gather + cumsum + compare + scatter, five or six launches
per layer on the query's critical path. The kernel is one launch and needs no sort: the taken set
is exactly {clusters whose (score, -index) key is >= a threshold}, and the threshold is found by
a 16-way search on the total size above it (monotone in the threshold):
  1. on the score's order-preserving int32 key (<= 9 passes over the group's C clusters),
  2. then among clusters tied at the boundary score, on the index (<= log16(C) + 1 passes).
One program per group; each pass re-reads the group's C scores and sizes (from L1/L2 after the
first), ~15 passes in all.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton

OP = "select_budget"
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZE_DTYPES = (torch.int32, torch.int64)

# Clusters per chunk of a pass, and thresholds tried per pass (a pass costs BLOCK_C x WAYS
# compares per chunk and cuts the search range WAYS-fold: 16 ways = ~9 + ~4 passes instead of
# ~33 + ~14 for plain bisection). Guesses until benchmark_select_budget.py's H100 sweep sets them.
DEFAULT_BLOCK_C = 256
DEFAULT_NUM_WARPS = 4
SEARCH_WAYS = 16


class Selection(NamedTuple):
    mask: torch.Tensor  # [G, C] bool, True = taken
    count: torch.Tensor  # [G] int64 clusters taken
    tokens: torch.Tensor  # [G] int64 summed size of the taken clusters (<= budget)


if HAS_TRITON:

    @triton.jit
    def _ordered_key(s):
        # int32 whose signed order is the float order; -0.0 counts as +0.0 (a tie, as in torch.sort).
        s = tl.where(s == 0.0, 0.0, s)
        bits = s.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    @triton.jit
    def _masses(s_row, z_row, C, t_ge, t_eq, j, BLOCK_C: tl.constexpr, WAYS: tl.constexpr):
        # For each of WAYS candidates w: summed size of the valid clusters with
        # key >= t_ge[w], or key == t_eq and index < j[w]. t_ge, j: [WAYS] int64; t_eq: int64.
        # Per-lane partial sums, reduced across the block once per pass (not once per chunk).
        acc = tl.zeros([BLOCK_C, WAYS], dtype=tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            inb = offs < C
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            z = tl.load(z_row + offs, mask=inb, other=0).to(tl.int64)
            key = _ordered_key(s).to(tl.int64)
            valid = s > float("-inf")  # False for NaN too
            tie = valid & (key == t_eq)
            sel = (valid[:, None] & (key[:, None] >= t_ge[None, :])) | (tie[:, None] & (offs[:, None] < j[None, :]))
            acc += tl.where(sel, z[:, None], 0)
        return tl.sum(acc, axis=0)

    @triton.jit(do_not_specialize=["C", "budget"])
    def _select_budget_kernel(
        scores_ptr,
        sizes_ptr,
        budgets_ptr,
        mask_ptr,
        count_ptr,
        tokens_ptr,
        C,
        budget,
        stride_sg,
        stride_zg,
        stride_mg,
        BLOCK_C: tl.constexpr,
        WAYS: tl.constexpr,
        PER_GROUP: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        s_row = scores_ptr + g * stride_sg
        z_row = sizes_ptr + g * stride_zg
        if PER_GROUP:
            b = tl.load(budgets_ptr + g).to(tl.int64)
        else:
            b = budget.to(tl.int64)
        c64 = C.to(tl.int64)

        # Pass 1: key range and total size of the valid clusters.
        kmin = tl.full([BLOCK_C], 2147483647, dtype=tl.int32)
        kmax = tl.full([BLOCK_C], -2147483648, dtype=tl.int32)
        tot = tl.zeros([BLOCK_C], dtype=tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            inb = offs < C
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            z = tl.load(z_row + offs, mask=inb, other=0).to(tl.int64)
            key = _ordered_key(s)
            valid = s > float("-inf")
            kmin = tl.where(valid, tl.minimum(kmin, key), kmin)
            kmax = tl.where(valid, tl.maximum(kmax, key), kmax)
            tot += tl.where(valid, z, 0)
        total = tl.sum(tot, axis=0)

        # WAYS-ary search for the key threshold. Invariant: mass(key >= lo) > b >= mass(key >= hi).
        # Each pass evaluates WAYS thresholds at once and shrinks (lo, hi) by a factor WAYS.
        ways = tl.arange(0, WAYS).to(tl.int64) + 1
        none = tl.zeros([WAYS], dtype=tl.int64)  # index bound 0: no tie group in play
        lo = tl.min(kmin, axis=0).to(tl.int64) - 1
        hi = tl.max(kmax, axis=0).to(tl.int64) + 1
        hi = tl.where(total <= b, lo + 1, hi)  # everything fits: no search, take key >= lo + 1
        while hi - lo > 1:
            step = (hi - lo + WAYS - 1) // WAYS
            t = tl.minimum(lo + step * ways, hi)
            fits = _masses(s_row, z_row, C, t, lo, none, BLOCK_C, WAYS) <= b
            hi = tl.min(tl.where(fits, t, hi), axis=0)
            lo = tl.max(tl.where(fits, lo, t), axis=0)

        # All keys >= hi are taken. The clusters with key == lo are tied at the boundary: take them
        # in index order while they fit. Invariant: mass(j_lo) <= b < mass(j_hi).
        at_hi = none + hi
        j_lo = c64 * 0
        j_hi = tl.where(total <= b, j_lo + 1, c64)
        while j_hi - j_lo > 1:
            step = (j_hi - j_lo + WAYS - 1) // WAYS
            j = tl.minimum(j_lo + step * ways, j_hi)
            fits = _masses(s_row, z_row, C, at_hi, lo, j, BLOCK_C, WAYS) <= b
            j_lo = tl.max(tl.where(fits, j, j_lo), axis=0)
            j_hi = tl.min(tl.where(fits, j_hi, j), axis=0)

        n = tl.zeros([BLOCK_C], dtype=tl.int64)
        t_sum = tl.zeros([BLOCK_C], dtype=tl.int64)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            inb = offs < C
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            z = tl.load(z_row + offs, mask=inb, other=0).to(tl.int64)
            key = _ordered_key(s).to(tl.int64)
            take = inb & (s > float("-inf")) & ((key >= hi) | ((key == lo) & (offs < j_lo)))
            tl.store(mask_ptr + g * stride_mg + offs, take, mask=inb)
            n += take.to(tl.int64)
            t_sum += tl.where(take, z, 0)
        tl.store(count_ptr + g, tl.sum(n, axis=0))
        tl.store(tokens_ptr + g, tl.sum(t_sum, axis=0))


def select_budget_reference(scores: torch.Tensor, sizes: torch.Tensor, budget: int | torch.Tensor) -> Selection:
    """Plain torch: stable sort by score descending, cumulative size, keep the prefix <= budget."""
    G, C = scores.shape
    s = scores.float().masked_fill(scores.isnan(), float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    valid = s.gather(1, order) > float("-inf")
    z = torch.where(valid, sizes.to(torch.int64).gather(1, order), 0)
    b = budget.to(device=scores.device, dtype=torch.int64)[:, None] if torch.is_tensor(budget) else budget
    take = valid & (torch.cumsum(z, dim=1) <= b)
    mask = torch.zeros_like(take).scatter(1, order, take)
    return Selection(mask, take.sum(1), torch.where(take, z, 0).sum(1))


def selected_ids(selection: Selection, max_count: int | None = None) -> torch.Tensor:
    """Taken cluster ids per group in ascending order, [G, K] int64 padded with -1.
    K = max_count, or the largest count (a device sync when on the GPU)."""
    mask = selection.mask
    G, C = mask.shape
    K = int(selection.count.max()) if max_count is None and G else (max_count or 0)
    idx = torch.arange(C, device=mask.device).expand(G, C)
    ids = torch.where(mask, idx, C).sort(dim=1).values[:, :K]
    return torch.where(ids < C, ids, -1)


def _check(scores, sizes, budget) -> None:
    if scores.dim() != 2:
        raise ValueError(f"{OP}: scores must be [G, C], got {tuple(scores.shape)}")
    _backend.check_dtype(OP, "scores", scores, SCORE_DTYPES)
    _backend.check_dtype(OP, "sizes", sizes, SIZE_DTYPES)
    _backend.check_shape(OP, "sizes", sizes, tuple(scores.shape))
    _backend.check_last_dim_contiguous(OP, "scores", scores)
    _backend.check_last_dim_contiguous(OP, "sizes", sizes)
    if torch.is_tensor(budget):
        _backend.check_shape(OP, "budget", budget, (scores.shape[0],))
        _backend.check_dtype(OP, "budget", budget, SIZE_DTYPES)
        _backend.same_device(OP, scores=scores, sizes=sizes, budget=budget)
    else:
        if int(budget) < 0:
            raise ValueError(f"{OP}: budget must be >= 0, got {budget}")
        _backend.same_device(OP, scores=scores, sizes=sizes)


def select_budget(
    scores: torch.Tensor,
    sizes: torch.Tensor,
    budget: int | torch.Tensor,
    *,
    backend: str = "auto",
    block_c: int | None = None,
    num_warps: int | None = None,
) -> Selection:
    """Best-first selection under a token budget, batched over groups.

    scores [G, C] (float; -inf/NaN = never take), sizes [G, C] int32/int64 (>= 0), budget an int
    for every group or an int tensor [G] (>= 0). Returns Selection(mask [G, C] bool, count [G],
    tokens [G]); the mask equals select_budget_reference's exactly.
    """
    _check(scores, sizes, budget)
    if _backend.choose(OP, backend, scores, sizes) == "torch":
        return select_budget_reference(scores, sizes, budget)
    G, C = scores.shape
    dev = scores.device
    mask = torch.empty((G, C), dtype=torch.bool, device=dev)
    count = torch.empty((G,), dtype=torch.int64, device=dev)
    tokens = torch.empty((G,), dtype=torch.int64, device=dev)
    if G == 0:
        return Selection(mask, count, tokens)
    if C == 0:
        count.zero_()
        tokens.zero_()
        return Selection(mask, count, tokens)
    per_group = torch.is_tensor(budget)
    block_c = min(_backend.next_power_of_2(block_c or DEFAULT_BLOCK_C), max(16, _backend.next_power_of_2(C)))
    with torch.cuda.device(dev) if scores.is_cuda else nullcontext():
        _select_budget_kernel[(G,)](
            scores, sizes, budget if per_group else count, mask, count, tokens,
            C, 0 if per_group else int(budget),
            scores.stride(0), sizes.stride(0), mask.stride(0),
            BLOCK_C=block_c, WAYS=SEARCH_WAYS, PER_GROUP=per_group,
            num_warps=num_warps or DEFAULT_NUM_WARPS,
        )
    return Selection(mask, count, tokens)
