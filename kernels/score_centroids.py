"""score_centroids: query . centroid for every (group, query, cluster) in one launch.

A group g is one (stream, layer, KV head) whose centroids sit in a padded slice centroids[g, :C]
with the first valid_count[g] slots live. query[g] holds Q vectors scored against that slice
(Q = 1 for one question's mean query; more for several questions or a predicted next-layer query).
Slots >= valid_count[g] score -inf, so a sort or `select_budget` never takes them, and their rows
are never read (masked loads), so padding costs no bandwidth.

The work is a batched [Q, D] x [D, C] product per group, bandwidth-bound on the centroids at small
Q: one program reads a BLOCK_C x D centroid tile once and scores it against BLOCK_Q queries with
tl.dot (fp32 accumulation; fp32 inputs use IEEE products, not TF32).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton

OP = "score_centroids"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
COUNT_DTYPES = (torch.int32, torch.int64)

# Centroids per program; a guess until the H100 sweep in benchmark_score_centroids.py sets it.
DEFAULT_BLOCK_C = 64
DEFAULT_NUM_WARPS = 4


if HAS_TRITON:

    @triton.jit
    def _score_centroids_kernel(
        q_ptr,
        c_ptr,
        count_ptr,
        out_ptr,
        Q,
        C,
        D,
        scale,
        stride_qg,
        stride_qq,
        stride_cg,
        stride_cc,
        stride_og,
        stride_oq,
        BLOCK_Q: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        live = tl.load(count_ptr + g).to(tl.int32)
        in_q = offs_q < Q
        in_c = offs_c < C
        live_c = in_c & (offs_c < live)
        q_rows = q_ptr + g * stride_qg + offs_q.to(tl.int64)[:, None] * stride_qq
        c_rows = c_ptr + g * stride_cg + offs_c.to(tl.int64)[:, None] * stride_cc
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            q = tl.load(q_rows + offs_d[None, :], mask=in_q[:, None] & in_d[None, :], other=0.0)
            c = tl.load(c_rows + offs_d[None, :], mask=live_c[:, None] & in_d[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                c = c.to(tl.float32)
            if IEEE:
                acc = tl.dot(q, tl.trans(c), acc, input_precision="ieee")
            else:
                acc = tl.dot(q, tl.trans(c), acc)
        acc = tl.where(live_c[None, :], acc * scale, float("-inf"))
        out = out_ptr + g * stride_og + offs_q.to(tl.int64)[:, None] * stride_oq + offs_c[None, :]
        tl.store(out, acc, mask=in_q[:, None] & in_c[None, :])


def score_centroids_reference(
    query: torch.Tensor, centroids: torch.Tensor, valid_count: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Plain torch in fp32: [G, Q, C] scores, -inf where c >= valid_count[g]."""
    C = centroids.shape[1]
    scores = torch.einsum("gqd,gcd->gqc", query.float(), centroids.float()) * scale
    live = torch.arange(C, device=centroids.device) < valid_count.to(centroids.device)[:, None]
    return scores.masked_fill(~live[:, None, :], float("-inf"))


def _check(query, centroids, valid_count, out) -> None:
    if query.dim() != 3 or centroids.dim() != 3:
        raise ValueError(
            f"{OP}: query must be [G, Q, D] and centroids [G, C, D], got {tuple(query.shape)} and {tuple(centroids.shape)}"
        )
    G, Q, D = query.shape
    if centroids.shape[0] != G or centroids.shape[2] != D:
        raise ValueError(f"{OP}: centroids {tuple(centroids.shape)} do not match query {tuple(query.shape)} in G or D")
    _backend.check_dtype(OP, "query", query, DTYPES)
    _backend.check_dtype(OP, "centroids", centroids, DTYPES)
    _backend.check_dtype(OP, "valid_count", valid_count, COUNT_DTYPES)
    _backend.check_shape(OP, "valid_count", valid_count, (G,))
    _backend.check_last_dim_contiguous(OP, "query", query)
    _backend.check_last_dim_contiguous(OP, "centroids", centroids)
    tensors = {"query": query, "centroids": centroids, "valid_count": valid_count}
    if out is not None:
        _backend.check_shape(OP, "out", out, (G, Q, centroids.shape[1]))
        _backend.check_dtype(OP, "out", out, (torch.float32,))
        _backend.check_last_dim_contiguous(OP, "out", out)
        tensors["out"] = out
    _backend.same_device(OP, **tensors)


def score_centroids(
    query: torch.Tensor,
    centroids: torch.Tensor,
    valid_count: torch.Tensor,
    *,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """scores[g, q, c] = scale * query[g, q] . centroids[g, c] in fp32; -inf for c >= valid_count[g].

    query [G, Q, D], centroids [G, C, D] (bf16/fp16/fp32, may differ: then both are read as fp32),
    valid_count [G] int32/int64, all on one device. Returns scores [G, Q, C] float32 (into `out`
    when given).
    """
    _check(query, centroids, valid_count, out)
    G, Q, D = query.shape
    C = centroids.shape[1]
    if out is None:
        out = torch.empty((G, Q, C), dtype=torch.float32, device=query.device)
    if _backend.choose(OP, backend, query, centroids) == "torch":
        out.copy_(score_centroids_reference(query, centroids, valid_count, scale))
        return out
    if G * Q * C == 0:
        return out
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers (it stores bf16 as uint16),
    # so under TRITON_INTERPRET bf16 tiles are widened first: same exact products, fp32 sums.
    bf16 = torch.bfloat16 in (query.dtype, centroids.dtype)
    upcast = query.dtype != centroids.dtype or (_backend.INTERPRET and bf16)
    ieee = upcast or query.dtype == torch.float32
    block_q = min(max(16, _backend.next_power_of_2(Q)), 64)
    block_c = max(16, _backend.next_power_of_2(block_c or DEFAULT_BLOCK_C))
    block_d = min(max(16, _backend.next_power_of_2(D)), 128)
    grid = (G, triton.cdiv(C, block_c), triton.cdiv(Q, block_q))
    with torch.cuda.device(query.device) if query.is_cuda else nullcontext():
        _score_centroids_kernel[grid](
            query, centroids, valid_count, out, Q, C, D, float(scale),
            query.stride(0), query.stride(1), centroids.stride(0), centroids.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_Q=block_q, BLOCK_C=block_c, BLOCK_D=block_d, UPCAST=upcast, IEEE=ieee,
            num_warps=num_warps or DEFAULT_NUM_WARPS,
        )
    return out
