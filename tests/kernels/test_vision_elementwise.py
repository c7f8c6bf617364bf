"""The vision tower's fused elementwise kernels equal transformers' own code (rotary) and the
plain definition (QuickGELU), for strided q/k as the tower passes them and for every dtype."""

import pytest
import torch
from transformers.activations import QuickGELUActivation
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from mosaic_ray.kernels.vision_elementwise import quick_gelu, rotary_vision

TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,dim", [(3, 16), (5, 80)])
def test_rotary_equals_transformers(device, dtype, heads, dim):
    g = torch.Generator().manual_seed(heads)
    n = 37
    # as the tower makes them: qkv [N, 3, H, D] -> q, k views with a row stride of 3 H D
    qkv = torch.randn(n, 3, heads, dim, generator=g).to(device, dtype)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    angles = torch.randn(n, dim // 2, generator=g).repeat(1, 2).to(device)
    cos, sin = angles.cos(), angles.sin()
    got_q, got_k = rotary_vision(q, k, cos, sin, backend="triton")
    want_q, want_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert got_q.is_contiguous() and got_q.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, want_k, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quick_gelu_equals_the_definition(device, dtype):
    x = (4 * torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    got = quick_gelu(x, backend="triton")
    want = QuickGELUActivation()(x.float()).to(dtype)  # the definition in fp32, rounded once
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    assert got.shape == x.shape and got.dtype == dtype


def test_rotary_refuses_mismatched_inputs(device):
    q = torch.randn(4, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos shape"):
        rotary_vision(q, q, torch.zeros(4, 6, device=device), torch.zeros(4, 8, device=device))
    with pytest.raises(ValueError, match="even"):
        rotary_vision(q[..., :7], q[..., :7], torch.zeros(4, 7, device=device), torch.zeros(4, 7, device=device))
