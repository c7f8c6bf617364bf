"""score_centroids kernel vs its fp32 torch reference, within a per-dtype tolerance."""

import pytest
import torch

from mosaic_ray.kernels.score_centroids import score_centroids, score_centroids_reference

# (rtol, atol) on scores of randn inputs (|score| ~ sqrt(D)). 16-bit inputs: products are exact in
# fp32 and only the summation order differs, but GPU tensor cores may add with less care, so the
# 16-bit rows are looser than fp32 (IEEE products, fp32 sums).
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-3, 1e-3),
}
# (G, Q, C, D, valid counts or None for "all")
SHAPES = [
    (1, 1, 1, 64, None),
    (3, 1, 37, 80, [37, 0, 20]),
    (2, 5, 130, 128, [1, 129]),
    (2, 17, 64, 64, [64, 70]),  # Q > 16: two query tiles; a count above C means all
    (1, 2, 0, 128, [0]),
]


def make(G, Q, C, D, counts, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((G, Q, D), generator=g).to(dtype)
    c = torch.randn((G, C, D), generator=g).to(dtype)
    n = torch.tensor(counts if counts is not None else [C] * G, dtype=torch.int32)
    return q.to(device), c.to(device), n.to(device)


def assert_scores_close(got, ref, rtol, atol):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "-inf exactly on the invalid slots"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("G,Q,C,D,counts", SHAPES)
def test_score_centroids_matches_reference(device, dtype, G, Q, C, D, counts):
    q, c, n = make(G, Q, C, D, counts, dtype, device)
    got = score_centroids(q, c, n, backend="triton").cpu()
    ref = score_centroids_reference(q.cpu(), c.cpu(), n.cpu())
    assert_scores_close(got, ref, *TOLERANCE[dtype])


def test_score_centroids_mixed_dtypes_scale_and_out(device):
    q, c, n = make(3, 2, 50, 128, [50, 10, 0], torch.bfloat16, device)
    q32 = q.float() + 0.001  # fp32 queries against bf16 centroids: both read as fp32
    out = torch.full((3, 2, 50), 5.0, device=device)
    got = score_centroids(q32, c, n, scale=128**-0.5, out=out, backend="triton")
    assert got is out
    ref = score_centroids_reference(q32.cpu(), c.cpu(), n.cpu(), scale=128**-0.5)
    assert_scores_close(got.cpu(), ref, *TOLERANCE[torch.float32])


def test_score_centroids_strided_query(device):
    """A query that is a view (e.g. one of several streams' rows) works without a copy."""
    q, c, n = make(2, 4, 33, 64, [33, 7], torch.float16, device)
    qv = q[:, ::2]
    got = score_centroids(qv, c, n, backend="triton").cpu()
    ref = score_centroids_reference(qv.cpu(), c.cpu(), n.cpu())
    assert_scores_close(got, ref, *TOLERANCE[torch.float16])


@pytest.mark.parametrize(
    "q_shape,c_shape,n_shape,error",
    [
        ((2, 1, 64), (3, 5, 64), (2,), ValueError),
        ((2, 1, 64), (2, 5, 32), (2,), ValueError),
        ((2, 1, 64), (2, 5, 64), (3,), ValueError),
        ((2, 64), (2, 5, 64), (2,), ValueError),
    ],
)
def test_score_centroids_rejects_bad_shapes(q_shape, c_shape, n_shape, error):
    with pytest.raises(error, match="score_centroids"):
        score_centroids(torch.randn(q_shape), torch.randn(c_shape), torch.zeros(n_shape, dtype=torch.int32), backend="triton")


def test_score_centroids_rejects_float_counts():
    with pytest.raises(TypeError, match="valid_count"):
        score_centroids(torch.randn(1, 1, 64), torch.randn(1, 3, 64), torch.zeros(1), backend="triton")
