"""assign_nearest: each new key's nearest centroid and squared distance, fused (ingest path).

x [G, n, D] are the keys to place in group g (one (stream, layer, KV head)); centroids[g, :C] with
the first num_valid[g] live. Output d2min [G, n] float32 and idx [G, n] int64 (the lowest index
among exact ties; -1 and +inf when the group has no live centroid).

d2 = |x|^2 - 2 x.c + |c|^2 in fp32 (tl.dot, IEEE products for fp32 inputs), clamped at 0. One
program keeps a BLOCK_N x D tile of x in registers and streams the group's live centroids in
BLOCK_C tiles, keeping a running (min, argmin): the [G, n, C] distance matrix never exists.
The expanded form loses absolute precision ~ eps * |x|^2 when x is very close to its centroid;
that is far below the cohesion thresholds it feeds (a fraction of the head's key variance).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton

OP = "assign_nearest"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
COUNT_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256  # x's tile stays in registers: one D chunk

# Tile sizes; a guess until the H100 sweep in scaling_bench/kernels/assign_nearest.py sets them.
DEFAULT_BLOCK_N = 64
DEFAULT_BLOCK_C = 64
DEFAULT_NUM_WARPS = 4


if HAS_TRITON:

    @triton.jit
    def _assign_nearest_kernel(
        x_ptr,
        c_ptr,
        count_ptr,
        d2_ptr,
        idx_ptr,
        n,
        C,
        D,
        stride_xg,
        stride_xn,
        stride_cg,
        stride_cc,
        stride_dg,
        stride_ig,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < n
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        live = tl.minimum(tl.load(count_ptr + g).to(tl.int32), C)

        x = tl.load(
            x_ptr + g * stride_xg + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :],
            mask=in_n[:, None] & in_d[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        xf = x.to(tl.float32)
        xn = tl.sum(xf * xf, axis=1)  # [BLOCK_N]

        # Running (min, argmin) per (row, column slot), reduced across slots once at the end: no
        # cross-thread reduction inside the loop. Strict '<' keeps the earliest tile per slot.
        best2 = tl.full([BLOCK_N, BLOCK_C], float("inf"), dtype=tl.float32)
        arg2 = tl.full([BLOCK_N, BLOCK_C], 2147483647, dtype=tl.int32)
        c_base = c_ptr + g * stride_cg
        for c0 in range(0, live, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            live_c = offs_c < live
            c = tl.load(
                c_base + offs_c.to(tl.int64)[:, None] * stride_cc + offs_d[None, :],
                mask=live_c[:, None] & in_d[None, :],
                other=0.0,
            )
            if UPCAST:
                c = c.to(tl.float32)
            cf = c.to(tl.float32)
            cn = tl.sum(cf * cf, axis=1)  # [BLOCK_C]
            if IEEE:
                dot = tl.dot(x, tl.trans(c), input_precision="ieee")
            else:
                dot = tl.dot(x, tl.trans(c))
            d2 = xn[:, None] - 2.0 * dot + cn[None, :]
            d2 = tl.where(live_c[None, :], d2, float("inf"))
            better = d2 < best2
            best2 = tl.where(better, d2, best2)
            arg2 = tl.where(better, offs_c[None, :], arg2)

        best = tl.min(best2, axis=1)
        # Lowest index among the slots that reach the row's minimum (exact ties -> lowest index).
        best_idx = tl.min(tl.where(best2 == best[:, None], arg2, 2147483647), axis=1)
        best_idx = tl.where(best_idx == 2147483647, -1, best_idx)  # no live centroid
        best = tl.where(best_idx >= 0, tl.maximum(best, 0.0), best)
        tl.store(d2_ptr + g * stride_dg + offs_n, best, mask=in_n)
        tl.store(idx_ptr + g * stride_ig + offs_n, best_idx.to(tl.int64), mask=in_n)


def assign_nearest_reference(
    x: torch.Tensor, centroids: torch.Tensor, num_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in fp32, same expanded formula; materializes [G, n, C]."""
    G, n, _ = x.shape
    C = centroids.shape[1]
    xf, cf = x.float(), centroids.float()
    d2 = (xf * xf).sum(-1)[:, :, None] - 2.0 * torch.bmm(xf, cf.transpose(1, 2)) + (cf * cf).sum(-1)[:, None, :]
    live = torch.arange(C, device=x.device) < num_valid.to(x.device)[:, None]
    d2 = d2.masked_fill(~live[:, None, :], float("inf"))
    if C == 0:
        return (torch.full((G, n), float("inf"), device=x.device), torch.full((G, n), -1, dtype=torch.int64, device=x.device))
    d2min, idx = d2.min(dim=-1)
    has = live.any(dim=1)[:, None].expand(G, n)
    return torch.where(has, d2min.clamp_min(0.0), float("inf")), torch.where(has, idx, -1)


def _check(x, centroids, num_valid) -> None:
    if x.dim() != 3 or centroids.dim() != 3:
        raise ValueError(f"{OP}: x must be [G, n, D] and centroids [G, C, D], got {tuple(x.shape)} and {tuple(centroids.shape)}")
    G, _, D = x.shape
    if centroids.shape[0] != G or centroids.shape[2] != D:
        raise ValueError(f"{OP}: centroids {tuple(centroids.shape)} do not match x {tuple(x.shape)} in G or D")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head_dim {D} > {MAX_HEAD_DIM} is not supported (x's tile lives in registers)")
    _backend.check_dtype(OP, "x", x, DTYPES)
    _backend.check_dtype(OP, "centroids", centroids, DTYPES)
    _backend.check_dtype(OP, "num_valid", num_valid, COUNT_DTYPES)
    _backend.check_shape(OP, "num_valid", num_valid, (G,))
    _backend.check_last_dim_contiguous(OP, "x", x)
    _backend.check_last_dim_contiguous(OP, "centroids", centroids)
    _backend.same_device(OP, x=x, centroids=centroids, num_valid=num_valid)


def assign_nearest(
    x: torch.Tensor,
    centroids: torch.Tensor,
    num_valid: torch.Tensor,
    *,
    backend: str = "auto",
    block_n: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2min [G, n] float32, idx [G, n] int64) of each x[g, i]'s nearest live centroid of group g.

    x [G, n, D], centroids [G, C, D] (bf16/fp16/fp32; differing dtypes are both read as fp32),
    num_valid [G] int32/int64, all on one device; D <= 256.
    """
    _check(x, centroids, num_valid)
    if _backend.choose(OP, backend, x, centroids) == "torch":
        return assign_nearest_reference(x, centroids, num_valid)
    G, n, D = x.shape
    C = centroids.shape[1]
    d2 = torch.empty((G, n), dtype=torch.float32, device=x.device)
    idx = torch.empty((G, n), dtype=torch.int64, device=x.device)
    if G * n == 0:
        return d2, idx
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers (it stores bf16 as uint16),
    # so under TRITON_INTERPRET bf16 tiles are widened first: same exact products, fp32 sums.
    bf16 = torch.bfloat16 in (x.dtype, centroids.dtype)
    upcast = x.dtype != centroids.dtype or (_backend.INTERPRET and bf16)
    ieee = upcast or x.dtype == torch.float32
    bn = max(16, min(_backend.next_power_of_2(block_n or DEFAULT_BLOCK_N), _backend.next_power_of_2(n)))
    bc = max(16, _backend.next_power_of_2(block_c or DEFAULT_BLOCK_C))
    bd = max(16, _backend.next_power_of_2(D))
    grid = (G, triton.cdiv(n, bn))
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _assign_nearest_kernel[grid](
            x, centroids, num_valid, d2, idx, n, C, D,
            x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
            d2.stride(0), idx.stride(0),
            BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, UPCAST=upcast, IEEE=ieee,
            num_warps=num_warps or DEFAULT_NUM_WARPS,
        )
    return d2, idx
