"""uva.py: when the pool can be read in place, and the CUDA view of pinned memory (GPU only)."""

import pytest
import torch

from mosaic_ray.kernels import backend
from mosaic_ray.kernels.uva import UVAError, device_view, uva_problem

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_uva_problem_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in uva_problem(torch.zeros(4))
    with pytest.raises(UVAError, match="no CUDA device"):
        device_view(torch.zeros(4))


@pytest.mark.gpu
@needs_cuda
def test_uva_problem_names_pageable_memory():
    assert "not pinned" in uva_problem(torch.zeros(4))
    assert uva_problem(torch.zeros(4).pin_memory()) is None
    assert uva_problem(torch.zeros(4, device="cuda")) is None


@pytest.mark.gpu
@needs_cuda
def test_device_view_aliases_pinned_memory():
    host = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8).to(torch.bfloat16).pin_memory()
    sub = host[1, :, 2:]  # a strided view with an offset
    view = device_view(sub)
    assert view.is_cuda and view.shape == sub.shape and view.stride() == sub.stride() and view.dtype == sub.dtype
    assert torch.equal(view.cpu(), sub)
    view.mul_(2)  # writes land in host memory
    torch.cuda.synchronize()
    assert torch.equal(sub, (torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)[1, :, 2:] * 2).to(torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
def test_kernel_reads_pinned_pool_in_place():
    """The production path: a pinned CPU tensor passed straight to the Triton kernel."""
    if backend.INTERPRET:
        pytest.skip("the interpreter does not read through UVA")
    from mosaic_ray.kernels.gather_rows import gather_rows

    pool = torch.randn(8, 2, 16, 128).to(torch.bfloat16).pin_memory()
    rows = torch.tensor([7 * 16 + 3, -1, 5], device="cuda")
    backend.FALLBACKS.clear()
    out_k, out_v = gather_rows(pool, rows, "kv", backend="triton")
    assert not backend.FALLBACKS
    assert torch.equal(out_k[0].cpu().view(torch.int16), pool[7, 0, 3].view(torch.int16))
    assert torch.equal(out_v[2].cpu().view(torch.int16), pool[0, 1, 5].view(torch.int16))
    assert not out_k[1].any()
