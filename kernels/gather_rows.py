"""gather_rows: copy single token rows from the host pool into device K/V buffers.

This is the token-level baseline's fetch, so it gets the same care as the cluster path: the pool
is read in place over PCIe (UVA, see uva.py), one program moves BLOCK_R rows of K and/or V, and
each row is D contiguous elements (256 B at D=128 bf16). Row addresses are `slab * S + offset`
(HostPool's addressing); -1 zero-fills the output row.

Alignment: every row starts at a multiple of D elements, and Triton specializes integer strides
that are multiples of 16, so for D % 16 == 0 the loads vectorize to 16-byte accesses even though
the row addresses are data.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton
from mosaic_ray.kernels.uva import uva_problem

OP = "gather_rows"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int64, torch.int32)
WHICH = ("k", "v", "kv")

# Tile elements per program per half; BLOCK_R = DEFAULT_TILE // BLOCK_D rows (32 at D=128).
# A guess until the H100 sweep in scaling_bench/kernels/gather_rows.py sets it.
DEFAULT_TILE = 4096
DEFAULT_NUM_WARPS = 4


if HAS_TRITON:

    # The row count and the rows' strides change with every question: specializing on them (== 1,
    # % 16) compiled a new variant mid-question (seconds of TTFT on a GPU); the output strides stay
    # specialized, their alignment is what lets the stores vectorize.
    @triton.jit(do_not_specialize=["B", "stride_rows_h", "stride_rows_b"])
    def _gather_rows_kernel(
        pool_ptr,
        rows_ptr,
        out_k_ptr,
        out_v_ptr,
        B,
        D,
        stride_pool_slab,
        stride_pool_kv,
        stride_pool_tok,
        stride_rows_h,
        stride_rows_b,
        stride_ok_h,
        stride_ok_b,
        stride_ov_h,
        stride_ov_b,
        slots_ptr,
        valid_ptr,
        stride_valid_h,
        stride_valid_b,
        S: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        LOAD_K: tl.constexpr,
        LOAD_V: tl.constexpr,
        SLOTTED: tl.constexpr,
        WRITE_VALID: tl.constexpr,
    ):
        # Row blocks on grid axis 0 (up to 2^31 - 1 programs), heads on axis 1 (up to 65535).
        offs_b = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.program_id(1).to(tl.int64)
        in_b = offs_b < B
        r = tl.load(rows_ptr + h * stride_rows_h + offs_b * stride_rows_b, mask=in_b, other=-1).to(tl.int64)
        valid = r >= 0
        r = tl.where(valid, r, 0)
        slab = r // S
        src = slab * stride_pool_slab + (r - slab * S) * stride_pool_tok  # [BLOCK_R] element offsets
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        load_mask = valid[:, None] & in_d[None, :]
        store_mask = in_b[:, None] & in_d[None, :]
        if SLOTTED:  # output row b of every head is row slots[b] of the outputs (a device-pool layer)
            ob1 = tl.load(slots_ptr + offs_b, mask=in_b, other=0).to(tl.int64)
        else:
            ob1 = offs_b.to(tl.int64)
        ob = ob1[:, None]
        if WRITE_VALID:
            tl.store(valid_ptr + h * stride_valid_h + ob1 * stride_valid_b, valid.to(tl.int8), mask=in_b)
        if LOAD_K:
            k = tl.load(pool_ptr + src[:, None] + offs_d[None, :], mask=load_mask, other=0.0)
            tl.store(out_k_ptr + h * stride_ok_h + ob * stride_ok_b + offs_d[None, :], k, mask=store_mask)
        if LOAD_V:
            v = tl.load(pool_ptr + stride_pool_kv + src[:, None] + offs_d[None, :], mask=load_mask, other=0.0)
            tl.store(out_v_ptr + h * stride_ov_h + ob * stride_ov_b + offs_d[None, :], v, mask=store_mask)


def gather_rows_reference(
    pool_kv: torch.Tensor,
    rows: torch.Tensor,
    which: str,
    out_k: torch.Tensor | None,
    out_v: torch.Tensor | None,
    out_slots: torch.Tensor | None = None,
    out_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Plain torch: index the pool where it lives, zero the -1 rows, copy into the outputs."""
    S = pool_kv.shape[2]
    r = rows.to(device=pool_kv.device, dtype=torch.int64)
    valid = r >= 0
    r = torch.where(valid, r, torch.zeros_like(r))
    slab, off = r // S, r % S
    for half, out in ((0, out_k), (1, out_v)):
        if out is not None and which in (("k", "kv") if half == 0 else ("v", "kv")):
            got = pool_kv[slab, half, off].masked_fill(~valid[..., None], 0)
            if out_slots is None:
                out.copy_(got, non_blocking=True)
            else:  # [H, B, D] -> rows out_slots[b] of out [N, H, D]
                out.index_copy_(0, out_slots.to(out.device), got.transpose(0, 1).to(out.device))
    if out_valid is not None:
        out_valid.index_copy_(0, out_slots.to(out_valid.device), valid.transpose(0, 1).to(out_valid.device))
    return out_k, out_v


def _check(pool_kv, rows, which, out_k, out_v, out_slots=None, out_valid=None) -> None:
    if pool_kv.dim() != 4 or pool_kv.shape[1] != 2:
        raise ValueError(f"{OP}: pool_kv must be [num_slabs, 2, S, D], got {tuple(pool_kv.shape)}")
    _backend.check_dtype(OP, "pool_kv", pool_kv, DTYPES)
    _backend.check_dtype(OP, "rows", rows, ID_DTYPES)
    if which not in WHICH:
        raise ValueError(f"{OP}: which must be one of {WHICH}, got {which!r}")
    if rows.dim() not in (1, 2):
        raise ValueError(f"{OP}: rows must be [B] or [H, B], got {tuple(rows.shape)}")
    if rows.dim() == 2 and rows.shape[0] > 65535:
        raise ValueError(f"{OP}: at most 65535 heads per call (a grid axis limit), got {rows.shape[0]}")
    if pool_kv.stride(3) != 1:
        raise ValueError(f"{OP}: pool_kv rows must be contiguous, got strides {pool_kv.stride()}")
    D = pool_kv.shape[3]
    shape = (*rows.shape, D)
    if out_slots is not None:
        if rows.dim() != 2 or out_slots.dim() != 1 or out_slots.numel() != rows.shape[1]:
            raise ValueError(f"{OP}: out_slots must be [B] for rows [H, B], got {tuple(out_slots.shape)} and {tuple(rows.shape)}")
        _backend.check_dtype(OP, "out_slots", out_slots, ID_DTYPES)
        for name, out in (("out_k", out_k), ("out_v", out_v)):
            if out is not None and (out.dim() != 3 or out.shape[1:] != (rows.shape[0], D)):
                raise ValueError(f"{OP}: with out_slots, {name} must be [N, {rows.shape[0]}, {D}], got {tuple(out.shape)}")
        if out_valid is not None and (out_valid.dtype != torch.bool or out_valid.dim() != 2 or out_valid.shape[1] != rows.shape[0]):
            raise ValueError(f"{OP}: out_valid must be bool [N, {rows.shape[0]}], got {out_valid.dtype} {tuple(out_valid.shape)}")
        shape = None
    elif out_valid is not None:
        raise ValueError(f"{OP}: out_valid needs out_slots")
    for name, out, needed in (("out_k", out_k, which in ("k", "kv")), ("out_v", out_v, which in ("v", "kv"))):
        if not needed:
            continue
        if out is None:
            raise ValueError(f"{OP}: which={which!r} needs {name}")
        if shape is not None:
            _backend.check_shape(OP, name, out, shape)
        if out.dtype != pool_kv.dtype:
            raise TypeError(f"{OP}: {name} dtype {out.dtype} must equal pool_kv dtype {pool_kv.dtype}")
        _backend.check_last_dim_contiguous(OP, name, out)
    outs = {n: o for n, o, w in (("out_k", out_k, "k"), ("out_v", out_v, "v")) if o is not None and w in which}
    dev = _backend.same_device(OP, **outs)
    if pool_kv.device != dev and pool_kv.device.type != "cpu":
        raise ValueError(f"{OP}: pool_kv must be on {dev} or on the host, got {pool_kv.device}")


def gather_rows(
    pool_kv: torch.Tensor,
    rows: torch.Tensor,
    which: str = "kv",
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
    *,
    out_slots: torch.Tensor | None = None,
    out_valid: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    block_rows: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Copy rows `rows` (slab * S + offset; -1 = zero row) of `pool_kv` into (out_k, out_v).

    pool_kv [N, 2, S, D] on the outputs' device or in (pinned) host memory; rows [B] or [H, B]
    int64 -> outputs [B, D] or [H, B, D]. With `out_slots` [B] (rows [H, B]) the outputs are a
    device-pool layer [N, H, D] and row (h, b) lands in out[out_slots[b], h]; `out_valid` [N, H]
    bool then receives rows >= 0 at the same places (a question's retrieved slots, filled in one
    launch with no staging buffer). `which` picks K, V or both; an output that is needed and
    not given is allocated on `device` (default: rows' device). Bit-exact. Rows must be < N*S
    (not checked on the GPU path: that would cost a device sync).
    The copy is asynchronous on the current stream: do not rewrite the pool rows it reads until it
    has finished (record an event after it). Returns (out_k, out_v), None for
    a half not gathered.
    """
    if which not in WHICH:
        raise ValueError(f"{OP}: which must be one of {WHICH}, got {which!r}")
    dev = torch.device(device) if device is not None else rows.device
    D = pool_kv.shape[-1] if pool_kv.dim() == 4 else 0
    if out_slots is None and which in ("k", "kv") and out_k is None:
        out_k = torch.empty((*rows.shape, D), dtype=pool_kv.dtype, device=dev)
    if out_slots is None and which in ("v", "kv") and out_v is None:
        out_v = torch.empty((*rows.shape, D), dtype=pool_kv.dtype, device=dev)
    _check(pool_kv, rows, which, out_k, out_v, out_slots, out_valid)
    out_any = out_k if which != "v" else out_v
    chosen = _backend.choose(OP, backend, pool_kv, out_any)
    if chosen == "triton" and out_any.is_cuda and pool_kv.device.type == "cpu":
        problem = uva_problem(pool_kv)
        if problem is not None:
            _backend.fallback(OP, problem, backend)
            chosen = "torch"
    if chosen == "torch":
        return gather_rows_reference(pool_kv, rows, which, out_k, out_v, out_slots, out_valid)

    r = rows if rows.dim() == 2 else rows.unsqueeze(0)
    H, B = r.shape
    if H * B == 0:
        return out_k, out_v
    if r.device != out_any.device:
        r = r.to(out_any.device, non_blocking=True)
    ok = out_k if out_k is not None else out_any  # a dummy pointer when K is not gathered
    ov = out_v if out_v is not None else out_any
    ok = ok if ok.dim() == 3 else ok.unsqueeze(0)
    ov = ov if ov.dim() == 3 else ov.unsqueeze(0)
    if out_slots is not None:  # [N, H, D]: the kernel's (h, b) strides are (stride 1, stride 0)
        ok, ov = ok.transpose(0, 1), ov.transpose(0, 1)
        slots = out_slots.to(out_any.device, torch.int64)
    else:
        slots = r  # unused pointer
    vt = out_valid.view(torch.int8).transpose(0, 1) if out_valid is not None else ok
    S = pool_kv.shape[2]
    block_d = _backend.next_power_of_2(D)
    block_r = block_rows or max(1, DEFAULT_TILE // block_d)
    block_r = _backend.next_power_of_2(block_r)  # fixed, not sized to B: one compiled variant
    grid = (triton.cdiv(B, block_r), H)
    with torch.cuda.device(out_any.device) if out_any.is_cuda else nullcontext():
        try:
            _gather_rows_kernel[grid](
                pool_kv, r, ok, ov, B, D,
                pool_kv.stride(0), pool_kv.stride(1), pool_kv.stride(2),
                r.stride(0), r.stride(1),
                ok.stride(0), ok.stride(1), ov.stride(0), ov.stride(1),
                slots, vt, vt.stride(0), vt.stride(1),
                S=S, BLOCK_R=block_r, BLOCK_D=block_d,
                LOAD_K=which in ("k", "kv") and out_k is not None, LOAD_V=which in ("v", "kv") and out_v is not None,
                SLOTTED=out_slots is not None, WRITE_VALID=out_valid is not None,
                num_warps=num_warps or DEFAULT_NUM_WARPS,
            )
        except ValueError as e:  # Triton's launcher refused a host pointer (no UVA mapping)
            if "cannot be accessed from Triton" not in str(e):
                raise
            _backend.fallback(OP, f"UVA launch refused: {e}", backend)
            return gather_rows_reference(pool_kv, rows, which, out_k, out_v, out_slots, out_valid)
    return out_k, out_v
