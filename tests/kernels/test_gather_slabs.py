"""gather_slabs kernel vs its torch reference: bit-exact, odd shapes, -1 ids, sources unchanged."""

import pytest
import torch

from mosaic_ray.kernels import backend
from mosaic_ray.kernels.gather_slabs import gather_slabs, gather_slabs_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (num_slabs, S, D, H or None for 1-D ids, M)
SHAPES = [
    (5, 1, 64, None, 0),
    (5, 1, 64, None, 1),
    (9, 7, 80, None, 5),
    (12, 16, 128, None, 7),
    (9, 7, 80, 3, 1),
    (12, 16, 128, 2, 5),
    (6, 16, 64, 4, 0),
    (10, 1, 128, 3, 9),
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def make_pool(num_slabs, S, D, dtype, pinned, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn((num_slabs, 2, S, D), generator=g).to(dtype)
    b = _bits(pool)
    b[0, 0, 0, 0] = -1  # a NaN payload: a copy must keep the bits
    if num_slabs > 1:
        b[1, 1, 0, :1] = 0x7FFF if pool.element_size() == 2 else 0x7FFFFFFF
    return pool.pin_memory() if pinned else pool


def make_ids(num_slabs, H, M, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (M,) if H is None else (H, M)
    ids = torch.randint(0, num_slabs, shape, generator=g)
    if M:
        flat = ids.view(-1)
        flat[:: 3] = -1  # skipped slots zero-fill
        flat[-1] = num_slabs - 1  # the last slab is reachable
    return ids


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_slabs,S,D,H,M", SHAPES)
def test_gather_slabs_matches_reference(device, host_pinned, dtype, num_slabs, S, D, H, M):
    pool = make_pool(num_slabs, S, D, dtype, host_pinned)
    before = pool.clone()
    ids = make_ids(num_slabs, H, M).to(device)
    lead = () if H is None else (H,)
    out_k = torch.full((*lead, M * S, D), 7.0, dtype=dtype, device=device)
    out_v = torch.full_like(out_k, 7.0)
    ref_k, ref_v = torch.empty_like(out_k), torch.empty_like(out_v)

    gather_slabs(pool, ids, out_k, out_v, backend="triton")
    gather_slabs_reference(pool, ids, ref_k, ref_v)

    assert torch.equal(_bits(out_k).cpu(), _bits(ref_k).cpu())
    assert torch.equal(_bits(out_v).cpu(), _bits(ref_v).cpu())
    assert torch.equal(_bits(pool), _bits(before)), "the pool must not change"


def test_gather_slabs_values_are_the_pool_slabs(device, host_pinned):
    """Check the reference itself on a hand-made case: slab order kept, -1 gives zeros."""
    S, D = 3, 64
    pool = make_pool(4, S, D, torch.float32, host_pinned)
    ids = torch.tensor([2, -1, 0], device=device)
    out_k = torch.empty((3 * S, D), device=device)
    out_v = torch.empty_like(out_k)
    gather_slabs(pool, ids, out_k, out_v, backend="triton")
    k, v = out_k.cpu().view(3, S, D), out_v.cpu().view(3, S, D)
    assert torch.equal(_bits(k[0]), _bits(pool[2, 0])) and torch.equal(_bits(v[0]), _bits(pool[2, 1]))
    assert torch.equal(_bits(k[2]), _bits(pool[0, 0])) and torch.equal(_bits(v[2]), _bits(pool[0, 1]))
    assert not k[1].any() and not v[1].any()


def test_gather_slabs_into_a_slice_of_a_larger_buffer(device, host_pinned):
    """Outputs may be views (head stride != M*S*D) as long as rows are contiguous."""
    S, D, H, M, T = 7, 80, 3, 4, 40
    pool = make_pool(8, S, D, torch.bfloat16, host_pinned)
    ids = make_ids(8, H, M).to(device)
    buf_k = torch.zeros((H, T, D), dtype=torch.bfloat16, device=device)
    buf_v = torch.zeros_like(buf_k)
    gather_slabs(pool, ids, buf_k[:, 5 : 5 + M * S], buf_v[:, 5 : 5 + M * S], backend="triton")
    ref_k = torch.empty((H, M * S, D), dtype=torch.bfloat16)
    ref_v = torch.empty_like(ref_k)
    gather_slabs_reference(pool, ids.cpu(), ref_k, ref_v)
    assert torch.equal(_bits(buf_k[:, 5 : 5 + M * S]).cpu(), _bits(ref_k))
    assert torch.equal(_bits(buf_v[:, 5 : 5 + M * S]).cpu(), _bits(ref_v))
    assert not buf_k[:, :5].any() and not buf_k[:, 5 + M * S :].any(), "rows outside the slice must stay"


def test_gather_slabs_int32_ids(device, host_pinned):
    pool = make_pool(6, 16, 64, torch.float16, host_pinned)
    ids = torch.tensor([[5, -1, 3]], dtype=torch.int32, device=device)
    out_k = torch.empty((1, 48, 64), dtype=torch.float16, device=device)
    out_v = torch.empty_like(out_k)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    gather_slabs(pool, ids, out_k, out_v, backend="triton")
    gather_slabs_reference(pool, ids, ref_k, ref_v)
    assert torch.equal(_bits(out_k), _bits(ref_k)) and torch.equal(_bits(out_v), _bits(ref_v))


@pytest.mark.parametrize(
    "change,error",
    [
        ("dtype", TypeError),
        ("shape", ValueError),
        ("ids_dtype", TypeError),
        ("rows_not_contiguous", ValueError),
        ("pool_shape", ValueError),
    ],
)
def test_gather_slabs_rejects_bad_inputs(device, change, error):
    S, D, M = 4, 64, 3
    pool = make_pool(5, S, D, torch.float32, False)
    ids = torch.tensor([0, 1, 2], device=device)
    out_k = torch.empty((M * S, D), device=device)
    out_v = torch.empty_like(out_k)
    if change == "dtype":
        out_k = out_k.half()
    elif change == "shape":
        out_k = torch.empty((M * S + 1, D), device=device)
    elif change == "ids_dtype":
        ids = ids.float()
    elif change == "rows_not_contiguous":
        out_k = torch.empty((M * S, 2 * D), device=device)[:, ::2]
    elif change == "pool_shape":
        pool = pool[:, :1]
    with pytest.raises(error, match="gather_slabs"):
        gather_slabs(pool, ids, out_k, out_v, backend="triton")


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(backend, "INTERPRET", False)
    pool = make_pool(4, 2, 64, torch.float32, False)
    ids = torch.tensor([3, -1])
    out_k, out_v = torch.empty((4, 64)), torch.empty((4, 64))
    gather_slabs(pool, ids, out_k, out_v)  # auto: the reference, silently
    assert torch.equal(out_k[:2], pool[3, 0]) and not out_k[2:].any()
    with pytest.raises(backend.KernelUnavailableError, match="gather_slabs"):
        gather_slabs(pool, ids, out_k, out_v, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pageable_pool_falls_back_loudly():
    pool = make_pool(4, 2, 64, torch.float32, pinned=False)
    ids = torch.tensor([3, -1], device="cuda")
    out_k = torch.empty((4, 64), device="cuda")
    out_v = torch.empty_like(out_k)
    if backend.INTERPRET:
        pytest.skip("the interpreter does not read through UVA")
    backend.FALLBACKS.clear()
    backend._warned.clear()  # warn-once state from earlier tests
    with pytest.warns(RuntimeWarning, match="not pinned"):
        gather_slabs(pool, ids, out_k, out_v)
    assert sum(backend.FALLBACKS.values()) == 1
    assert torch.equal(out_k[:2].cpu(), pool[3, 0])
    with pytest.raises(backend.KernelUnavailableError, match="not pinned"):
        gather_slabs(pool, ids, out_k, out_v, backend="triton")
