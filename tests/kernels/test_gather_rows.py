"""gather_rows kernel vs its torch reference: bit-exact, odd shapes, -1 rows, K/V/both."""

import pytest
import torch

from mosaic_ray.kernels.gather_rows import gather_rows, gather_rows_reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WHICH = ["k", "v", "kv"]
# (num_slabs, S, D, H or None for 1-D rows, B)
SHAPES = [
    (4, 1, 64, None, 0),
    (4, 1, 64, None, 1),
    (9, 7, 80, None, 33),
    (6, 16, 128, 3, 1),
    (9, 7, 80, 2, 70),
    (5, 16, 64, 3, 17),
]
BLOCK_ROWS = [None, 1, 4]  # the default tile, one row per program, a small tile (several programs per head)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def make_pool(num_slabs, S, D, dtype, pinned, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn((num_slabs, 2, S, D), generator=g).to(dtype)
    _bits(pool)[0, 1, 0, 0] = -1  # a NaN payload in a V row
    return pool.pin_memory() if pinned else pool


def make_rows(num_rows, H, B, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_rows, (B,) if H is None else (H, B), generator=g)
    if B:
        flat = rows.view(-1)
        flat[1::4] = -1
        flat[0] = num_rows - 1
    return rows


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_slabs,S,D,H,B", SHAPES)
def test_gather_rows_matches_reference(device, host_pinned, which, dtype, num_slabs, S, D, H, B):
    pool = make_pool(num_slabs, S, D, dtype, host_pinned)
    before = pool.clone()
    rows = make_rows(num_slabs * S, H, B).to(device)
    out_k, out_v = gather_rows(pool, rows, which, backend="triton")
    shape = (*rows.shape, D)
    ref_k = torch.empty(shape, dtype=dtype) if "k" in which else None
    ref_v = torch.empty(shape, dtype=dtype) if "v" in which else None
    gather_rows_reference(pool, rows, which, ref_k, ref_v)
    for got, ref in ((out_k, ref_k), (out_v, ref_v)):
        assert (got is None) == (ref is None)
        if ref is not None:
            assert got.device.type == device.type
            assert torch.equal(_bits(got).cpu(), _bits(ref))
    assert torch.equal(_bits(pool), _bits(before)), "the pool must not change"


@pytest.mark.parametrize("block_rows", BLOCK_ROWS)
def test_gather_rows_tile_sizes(device, host_pinned, block_rows):
    pool = make_pool(9, 7, 80, torch.bfloat16, host_pinned)
    rows = make_rows(63, 3, 29).to(device)
    out_k, out_v = gather_rows(pool, rows, "kv", backend="triton", block_rows=block_rows)
    ref_k, ref_v = gather_rows(pool, rows.cpu(), "kv", backend="torch")
    assert torch.equal(_bits(out_k).cpu(), _bits(ref_k)) and torch.equal(_bits(out_v).cpu(), _bits(ref_v))


def test_gather_rows_addresses(device, host_pinned):
    """Row r is slab r // S, offset r % S; -1 is a zero row."""
    S, D = 7, 64
    pool = make_pool(3, S, D, torch.float32, host_pinned)
    rows = torch.tensor([15, -1, 0, 20], device=device)
    out_k, out_v = gather_rows(pool, rows, "kv", backend="triton")
    out_k, out_v = out_k.cpu(), out_v.cpu()
    assert torch.equal(out_k[0], pool[2, 0, 1]) and torch.equal(_bits(out_v[0]), _bits(pool[2, 1, 1]))
    assert torch.equal(out_k[2], pool[0, 0, 0]) and torch.equal(out_k[3], pool[2, 0, 6])
    assert not out_k[1].any() and not out_v[1].any()


def test_gather_rows_into_given_strided_outputs(device, host_pinned):
    pool = make_pool(6, 16, 64, torch.float16, host_pinned)
    rows = make_rows(96, 2, 9).to(device)
    buf = torch.zeros((2, 2, 12, 64), dtype=torch.float16, device=device)  # [H, K/V, T, D]
    gather_rows(pool, rows, "kv", buf[:, 0, :9], buf[:, 1, 2:11], backend="triton")
    ref_k, ref_v = gather_rows(pool, rows.cpu(), "kv", backend="torch")
    assert torch.equal(_bits(buf[:, 0, :9]).cpu(), _bits(ref_k))
    assert torch.equal(_bits(buf[:, 1, 2:11]).cpu(), _bits(ref_v))
    assert not buf[:, 0, 9:].any() and not buf[:, 1, :2].any()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"which": "q"}, ValueError, "which"),
        ({"which": "kv", "out_k": torch.empty(3, 64, dtype=torch.float16)}, TypeError, "dtype"),
        ({"which": "k", "out_k": torch.empty(4, 64)}, ValueError, "shape"),
    ],
)
def test_gather_rows_rejects_bad_inputs(kwargs, error, match):
    pool = make_pool(2, 4, 64, torch.float32, False)
    rows = torch.tensor([0, 1, 2])
    with pytest.raises(error, match=match):
        gather_rows(pool, rows, backend="triton", **kwargs)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("num_slabs,S,D,H,B", [(9, 7, 80, 2, 70), (5, 16, 128, 4, 33), (4, 4, 64, 3, 1)])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_gather_rows_into_slots(device, host_pinned, which, num_slabs, S, D, H, B, block_rows):
    """Slotted output: row (h, b) lands in out[slots[b], h] of a device-pool layer, validity beside
    it; every other slot of the layer is untouched."""
    dtype = torch.bfloat16
    pool = make_pool(num_slabs, S, D, dtype, host_pinned)
    rows = make_rows(num_slabs * S, H, B).to(device)
    N = 2 * B + 5
    slots = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:B].to(device)
    out = {n: torch.randn(N, H, D).to(dtype).to(device) for n in ("k", "v")}
    valid = torch.ones(N, H, dtype=torch.bool, device=device)
    ref = {n: t.clone().cpu() for n, t in out.items()}
    ref_valid = valid.clone().cpu()
    gather_rows_reference(pool, rows.cpu(), which, ref["k"] if "k" in which else None, ref["v"] if "v" in which else None,
                          out_slots=slots.cpu(), out_valid=ref_valid)
    gather_rows(pool, rows, which, out["k"] if "k" in which else None, out["v"] if "v" in which else None,
                out_slots=slots, out_valid=valid, backend="triton", block_rows=block_rows)
    for n in ("k", "v"):
        assert torch.equal(_bits(out[n]).cpu(), _bits(ref[n]))
    assert torch.equal(valid.cpu(), ref_valid)
    # the reference itself: what a plain gather gives, at the slots
    plain_k, plain_v = gather_rows_reference(pool, rows.cpu(), "kv", torch.empty(H, B, D, dtype=dtype), torch.empty(H, B, D, dtype=dtype))
    if "k" in which:
        assert torch.equal(_bits(ref["k"][slots.cpu()]), _bits(plain_k.transpose(0, 1)))
    assert torch.equal(ref_valid[slots.cpu()], (rows.cpu() >= 0).T)


def test_gather_rows_into_slots_rejects_bad_shapes(device):
    pool = make_pool(2, 4, 64, torch.bfloat16, False)
    rows = torch.zeros(3, 5, dtype=torch.int64, device=device)
    out = torch.zeros(10, 2, 64, dtype=torch.bfloat16, device=device)  # 2 heads, rows have 3
    with pytest.raises(ValueError, match="out_slots"):
        gather_rows(pool, rows, "k", out, out_slots=torch.arange(5, device=device), backend="triton")
    with pytest.raises(ValueError, match="out_slots must be"):
        gather_rows(pool, rows, "k", out, out_slots=torch.arange(4, device=device), backend="triton")
