"""vision_elementwise: the vision tower's elementwise chains, one kernel each (Liger-Kernel's idea).

    rotary_vision(q, k, cos, sin)   Qwen2-VL's `apply_rotary_pos_emb_vision`: q, k [N, H, D] (any
                                    row strides, last dim contiguous), cos / sin [N, D] -> new
                                    contiguous q, k in their dtype, math in fp32
    quick_gelu(x)                   x * sigmoid(1.702 x), math in fp32

Why: in eager transformers these are chains of small launches over the tower's whole packed
sequence (~14k patches for a 24-frame batch at 336 px): the rotary converts q and k to fp32, then
multiplies, negates, concatenates, adds and converts back (~14 kernels, each a pass over 74 MB),
QuickGELU is mul, sigmoid, mul. Each fused kernel reads its inputs once and writes its outputs
once: on the H200 at 7b-shape with 64 streams, the vision tower's GPU time in a 3 s profile fell
from 586 to 358 ms with them (`docs/benchmarks.md` 10.5).

Numbers: the same fp32 math as transformers' code, rounded once to the input dtype at the end
(transformers rounds QuickGELU's intermediates to bf16; the fused one does not, so it is closer
to the fp32 result). References (`*_reference`) are the plain torch definitions.
"""

from __future__ import annotations

import torch

from mosaic_ray.kernels import backend as _backend
from mosaic_ray.kernels.backend import HAS_TRITON, tl, triton

ROTARY_OP, GELU_OP = "rotary_vision", "quick_gelu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rotary_vision_reference(q, k, cos, sin):
    """transformers' `apply_rotary_pos_emb_vision`: rotate-half rotary in fp32, cast back."""
    def rotate(x):
        xf = x.float()
        half = x.shape[-1] // 2
        rot = torch.cat([-xf[..., half:], xf[..., :half]], -1)
        return (xf * cos[:, None].float() + rot * sin[:, None].float()).to(x.dtype)

    return rotate(q), rotate(k)


def quick_gelu_reference(x):
    xf = x.float()
    return (xf * torch.sigmoid(1.702 * xf)).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, stride_st,
                       H, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # one token: all heads; first half out = x1 cos1 - x2 sin1, second half x2 cos2 + x1 sin2
        t = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_HALF)
        ok = (h < H)[:, None] & (d < HALF)[None, :]
        d_ok = d < HALF
        c1 = tl.load(cos_ptr + t * stride_ct + d, mask=d_ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_st + d, mask=d_ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_st + HALF + d, mask=d_ok, other=0.0).to(tl.float32)
        src = x_ptr + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        dst = out_ptr + t.to(tl.int64) * (H * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
        tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
        y = x / (1.0 + tl.exp(-1.702 * x))
        tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=ok)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    N, H, D = x.shape
    out = torch.empty(N, H, D, dtype=x.dtype, device=x.device)
    if N:
        half = D // 2
        _rotary_kernel[(N,)](x, out, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), H,
                             HALF=half, BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(half),
                             num_warps=4)
    return out


def rotary_vision(q, k, cos, sin, *, backend: str = "auto"):
    """See the module docstring: (q_embed, k_embed), each [N, H, D] contiguous in q's / k's dtype."""
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 3 or x.shape[-1] % 2 or x.stride(-1) != 1:
            raise ValueError(f"{ROTARY_OP}: {name} must be [N, H, D] with an even, contiguous last dim; got {tuple(x.shape)}")
        _backend.check_dtype(ROTARY_OP, name, x, DTYPES)
    N, _, D = q.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _backend.check_shape(ROTARY_OP, name, t, (N, D))
        if t.stride(-1) != 1:
            raise ValueError(f"{ROTARY_OP}: {name}'s last dim must be contiguous")
    if k.shape[0] != N or k.shape[-1] != D:
        raise ValueError(f"{ROTARY_OP}: k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if _backend.choose(ROTARY_OP, backend, q, k, cos, sin) == "torch":
        return rotary_vision_reference(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def quick_gelu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x * sigmoid(1.702 x), same shape and dtype as x."""
    _backend.check_dtype(GELU_OP, "x", x, DTYPES)
    if _backend.choose(GELU_OP, backend, x) == "torch":
        return quick_gelu_reference(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    n, block = x.numel(), 2048
    if n:
        _quick_gelu_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block, num_warps=8)
    return out
