"""assign_nearest kernel vs its torch reference: d2 within a per-dtype tolerance, the argmin exact
wherever the best centroid wins by more than that tolerance."""

import pytest
import torch

from mosaic_ray.kernels.assign_nearest import assign_nearest, assign_nearest_reference

# (rtol, atol) on squared distances of randn inputs (d2 ~ 2 D) (fp32 products, not TF32).
TOLERANCE = {
    torch.float32: (1e-5, 1e-3),
    torch.float16: (1e-4, 1e-2),
    torch.bfloat16: (1e-4, 1e-2),
}
# (G, n, C, D, valid counts or None for "all", block_c or None)
SHAPES = [
    (1, 1, 1, 64, None, None),
    (3, 33, 37, 80, [37, 0, 5], None),
    (2, 70, 200, 128, [200, 130], 64),  # several centroid tiles and x tiles
    (2, 17, 50, 64, [80, 1], 16),
    (1, 5, 0, 64, [0], None),
]


def make(G, n, C, D, counts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((G, n, D), generator=g).to(dtype)
    c = torch.randn((G, C, D), generator=g).to(dtype)
    k = torch.tensor(counts if counts is not None else [C] * G, dtype=torch.int64)
    return x.to(device), c.to(device), k.to(device)


def check(x, c, k, d2, idx, rtol, atol):
    rd, ri = assign_nearest_reference(x.cpu(), c.cpu(), k.cpu())
    d2, idx = d2.cpu(), idx.cpu()
    assert d2.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(torch.isinf(d2), torch.isinf(rd)) and torch.equal(idx == -1, ri == -1)
    fin = torch.isfinite(rd)
    torch.testing.assert_close(d2[fin], rd[fin], rtol=rtol, atol=atol)
    if not fin.any():
        return
    # Where the reference's winner beats the runner-up by more than the tolerance, the index must match;
    # elsewhere the kernel's pick must be as near as the reference's, within tolerance.
    xf, cf = x.cpu().float(), c.cpu().float()
    full = torch.cdist(xf.double(), cf.double()).pow(2) if c.shape[1] else None
    live = torch.arange(c.shape[1]) < k.cpu()[:, None]
    full = full.masked_fill(~live[:, None, :], float("inf"))
    top2 = full.topk(min(2, full.shape[-1]), dim=-1, largest=False).values
    margin = top2[..., 1] - top2[..., 0] if top2.shape[-1] > 1 else torch.full_like(top2[..., 0], float("inf"))
    clear = fin & (margin > 2 * (atol + rtol * top2[..., 0]))
    assert torch.equal(idx[clear], ri[clear])
    picked = full.gather(-1, idx.clamp_min(0)[..., None])[..., 0]
    assert bool((picked[fin] <= top2[..., 0][fin] + 2 * (atol + rtol * top2[..., 0][fin])).all())


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("G,n,C,D,counts,block_c", SHAPES)
def test_assign_nearest_matches_reference(device, dtype, G, n, C, D, counts, block_c):
    x, c, k = make(G, n, C, D, counts, dtype, device)
    d2, idx = assign_nearest(x, c, k, backend="triton", block_c=block_c)
    check(x, c, k, d2, idx, *TOLERANCE[dtype])


def test_assign_nearest_ties_take_the_lowest_index(device):
    """x equal to a centroid that appears twice (in two different tiles): the lower index wins."""
    G, C, D = 1, 40, 64
    x, c, k = make(G, 3, C, D, None, torch.float32, device, seed=3)
    c[0, 33] = c[0, 2]
    c[0, 20] = c[0, 35]
    x[0, 0] = c[0, 2]
    x[0, 1] = c[0, 35]
    d2, idx = assign_nearest(x, c, k, backend="triton", block_c=16)
    assert idx[0, :2].tolist() == [2, 20]
    assert float(d2[0, 0]) <= 1e-3 and float(d2[0, 1]) <= 1e-3


def test_assign_nearest_only_looks_at_live_centroids(device):
    x, c, k = make(1, 4, 8, 64, [3], torch.float32, device, seed=4)
    c[0, 5] = x[0, 0]  # an exact match, but in a dead slot
    d2, idx = assign_nearest(x, c, k, backend="triton")
    assert bool((idx < 3).all()) and float(d2[0, 0]) > 1.0


def test_assign_nearest_rejects_large_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        assign_nearest(torch.zeros(1, 2, 512), torch.zeros(1, 3, 512), torch.ones(1, dtype=torch.int64), backend="triton")
