"""gather_slabs: copy whole slabs (a cluster's runs) from the host pool into device K/V buffers.

pool_kv [N, 2, S, D] is HostPool.kv: slab n holds S K rows then S V rows, each half contiguous.
slab_ids [M] or [H, M] (int64; -1 = skip, the output slab is zero-filled) picks slabs;
out_k / out_v [M*S, D] or [H, M*S, D] receive them in the order given.

On a GPU the pool stays in pinned host memory and the kernel reads it in place over PCIe (UVA,
see uva.py): one program copies one slab's K and V (2 * S * D elements), so reads are S*D*elem
contiguous bytes (4 KB at S=16, D=128, bf16) and no host thread or staging buffer is involved.
The output of one slab is also contiguous (rows of stride D), which the wrapper checks.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton
from mosaic_ray.kernels.uva import uva_problem

OP = "gather_slabs"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int64, torch.int32)

# Elements per program per half (K or V). A guess until the H100 sweep in benchmark_gather_slabs.py
# sets it: 2048 bf16 = one whole 16x128 slab, 4 KB in flight per half per program.
DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 4


if HAS_TRITON:

    @triton.jit
    def _gather_slabs_kernel(
        pool_ptr,
        ids_ptr,
        out_k_ptr,
        out_v_ptr,
        M,
        stride_pool_slab,
        stride_pool_kv,
        stride_ids_h,
        stride_ids_m,
        stride_out_k_h,
        stride_out_v_h,
        SLAB_ELEMS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one (h, m) slab
        blk = tl.program_id(1)  # which BLOCK of its S*D elements
        h = (pid // M).to(tl.int64)
        m = (pid % M).to(tl.int64)
        sid = tl.load(ids_ptr + h * stride_ids_h + m * stride_ids_m).to(tl.int64)
        valid = sid >= 0
        sid = tl.where(valid, sid, 0)  # masked lanes never dereference, but keep addresses in range

        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < SLAB_ELEMS
        src = pool_ptr + sid * stride_pool_slab + offs
        k = tl.load(src, mask=inside & valid, other=0.0)
        v = tl.load(src + stride_pool_kv, mask=inside & valid, other=0.0)
        dst = m * SLAB_ELEMS + offs
        tl.store(out_k_ptr + h * stride_out_k_h + dst, k, mask=inside)
        tl.store(out_v_ptr + h * stride_out_v_h + dst, v, mask=inside)


def gather_slabs_reference(
    pool_kv: torch.Tensor, slab_ids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: index the pool where it lives, zero the -1 slots, copy into the outputs."""
    S, D = pool_kv.shape[2], pool_kv.shape[3]
    ids = slab_ids.to(device=pool_kv.device, dtype=torch.int64)
    valid = ids >= 0
    kv = pool_kv[torch.where(valid, ids, torch.zeros_like(ids))]  # [..., M, 2, S, D]
    kv = kv.masked_fill(~valid[..., None, None, None], 0)
    lead = tuple(ids.shape[:-1])
    M = ids.shape[-1]
    out_k.copy_(kv[..., 0, :, :].reshape(*lead, M * S, D), non_blocking=True)
    out_v.copy_(kv[..., 1, :, :].reshape(*lead, M * S, D), non_blocking=True)
    return out_k, out_v


def _check(pool_kv: torch.Tensor, slab_ids: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
    if pool_kv.dim() != 4 or pool_kv.shape[1] != 2:
        raise ValueError(f"{OP}: pool_kv must be [num_slabs, 2, S, D], got {tuple(pool_kv.shape)}")
    _backend.check_dtype(OP, "pool_kv", pool_kv, DTYPES)
    _backend.check_dtype(OP, "slab_ids", slab_ids, ID_DTYPES)
    if slab_ids.dim() not in (1, 2):
        raise ValueError(f"{OP}: slab_ids must be [M] or [H, M], got {tuple(slab_ids.shape)}")
    S, D = pool_kv.shape[2], pool_kv.shape[3]
    shape = (*slab_ids.shape[:-1], slab_ids.shape[-1] * S, D)
    for name, out in (("out_k", out_k), ("out_v", out_v)):
        _backend.check_shape(OP, name, out, shape)
        if out.dtype != pool_kv.dtype:
            raise TypeError(f"{OP}: {name} dtype {out.dtype} must equal pool_kv dtype {pool_kv.dtype}")
        if out.numel() and (out.stride(-1) != 1 or out.stride(-2) != D):
            raise ValueError(f"{OP}: {name} rows must be contiguous (strides [..., {D}, 1]), got {out.stride()}")
    if pool_kv.stride(3) != 1 or pool_kv.stride(2) != D:
        raise ValueError(f"{OP}: pool_kv's K and V halves must be contiguous [S, D] blocks, got strides {pool_kv.stride()}")
    _backend.same_device(OP, out_k=out_k, out_v=out_v)
    if pool_kv.device != out_k.device and not pool_kv.device.type == "cpu":
        raise ValueError(f"{OP}: pool_kv must be on {out_k.device} or on the host, got {pool_kv.device}")


def gather_slabs(
    pool_kv: torch.Tensor,
    slab_ids: torch.Tensor,
    out_k: torch.Tensor,
    out_v: torch.Tensor,
    *,
    backend: str = "auto",
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy slabs `slab_ids` of `pool_kv` into `out_k`, `out_v` (bit-exact; -1 ids zero-fill).

    pool_kv [N, 2, S, D] bf16/fp16/fp32, on the outputs' device or in (pinned) host memory;
    slab_ids [M] -> outputs [M*S, D], or [H, M] -> outputs [H, M*S, D]; ids must be < N (not
    checked on the GPU path: that would cost a device sync).
    The copy is asynchronous on the current stream: do not rewrite the pool rows it reads until it
    has finished (record an event after it). Returns (out_k, out_v).
    """
    _check(pool_kv, slab_ids, out_k, out_v)
    chosen = _backend.choose(OP, backend, pool_kv, out_k)
    if chosen == "triton" and out_k.is_cuda and pool_kv.device.type == "cpu":
        problem = uva_problem(pool_kv)
        if problem is not None:
            _backend.fallback(OP, problem, backend)
            chosen = "torch"
    if chosen == "torch":
        return gather_slabs_reference(pool_kv, slab_ids, out_k, out_v)

    ids = slab_ids if slab_ids.dim() == 2 else slab_ids.unsqueeze(0)
    H, M = ids.shape
    if H * M == 0:
        return out_k, out_v
    if ids.device != out_k.device:
        ids = ids.to(out_k.device, non_blocking=True)
    ok = out_k if out_k.dim() == 3 else out_k.unsqueeze(0)
    ov = out_v if out_v.dim() == 3 else out_v.unsqueeze(0)
    S, D = pool_kv.shape[2], pool_kv.shape[3]
    slab_elems = S * D
    blk = min(block or DEFAULT_BLOCK, _backend.next_power_of_2(slab_elems))
    grid = (H * M, triton.cdiv(slab_elems, blk))
    with torch.cuda.device(out_k.device) if out_k.is_cuda else nullcontext():
        try:
            _gather_slabs_kernel[grid](
                pool_kv, ids, ok, ov, M,
                pool_kv.stride(0), pool_kv.stride(1),
                ids.stride(0), ids.stride(1),
                ok.stride(0), ov.stride(0),
                SLAB_ELEMS=slab_elems, BLOCK=blk,
                num_warps=num_warps or DEFAULT_NUM_WARPS,
            )
        except ValueError as e:  # Triton's launcher refused a host pointer (no UVA mapping)
            if "cannot be accessed from Triton" not in str(e):
                raise
            _backend.fallback(OP, f"UVA launch refused: {e}", backend)
            return gather_slabs_reference(pool_kv, slab_ids, out_k, out_v)
    return out_k, out_v

