"""gather_clusters kernel vs its torch reference: the same slots, validity and counters, bit-exact;
and the reference vs a plain per-cluster loop (what "taken members, back to back" means)."""

import pytest
import torch

from mosaic_ray.kernels.gather_clusters import cluster_positions, gather_clusters, gather_clusters_reference


def _bits(t):
    return t.view(torch.int16)


def _case(H, C, S, max_slabs, budget, seed, pinned, device):
    g = torch.Generator().manual_seed(seed)
    num_slabs = H * C * max_slabs + 3
    pool = torch.randn(num_slabs, 2, S, 64, generator=g).to(torch.bfloat16)
    pool = pool.pin_memory() if pinned else pool
    sizes_raw = torch.randint(0, S * max_slabs + 1, (H, C), generator=g)
    slabs = torch.randperm(num_slabs, generator=g)[: H * C * max_slabs].view(H, C, max_slabs)
    slabs = torch.where(torch.arange(max_slabs)[None, None] * S < sizes_raw[..., None], slabs, -1)
    scores = torch.randn(H, C, generator=g)
    order = torch.argsort(scores, dim=1, descending=True)
    sizes = sizes_raw.gather(1, order)
    csum = torch.cumsum(sizes, 1)
    W = min(budget, int(sizes_raw.sum(1).max()) + 2)
    N = 3 * W + 7
    slots = torch.randperm(N, generator=g)[:W]
    to = lambda t: t.to(device)  # noqa: E731
    return pool, to(order), to(sizes), to(csum), to(slabs), W, to(slots), N, sizes_raw, slabs, order


@pytest.mark.parametrize("H,C,S,max_slabs,budget", [(4, 37, 4, 3, 50), (2, 5, 4, 2, 1000), (3, 64, 16, 2, 200),
                                                     (1, 1, 4, 1, 3), (2, 9, 4, 4, 0)])
def test_gather_clusters_matches_reference(device, host_pinned, H, C, S, max_slabs, budget):
    pool, order, sizes, csum, slabs, W, slots, N, *_ = _case(H, C, S, max_slabs, budget, 0, host_pinned, device)
    outs = {}
    for name, dev, backend in (("ref", torch.device("cpu"), "torch"), ("kernel", device, "triton")):
        k = torch.full((N, H, 64), 7.0, dtype=torch.bfloat16, device=dev)
        v = torch.full((N, H, 64), -7.0, dtype=torch.bfloat16, device=dev)
        valid = torch.ones(N, H, dtype=torch.bool, device=dev)
        counts = torch.zeros(5, dtype=torch.int64, device=dev)
        gather_clusters(pool, order.to(dev), sizes.to(dev), csum.to(dev), slabs.to(dev), budget, slots.to(dev),
                        k, v, valid, counts, backend=backend)
        outs[name] = (k.cpu(), v.cpu(), valid.cpu(), counts.cpu())
    for a, b in zip(outs["ref"], outs["kernel"]):
        assert torch.equal(_bits(a) if a.dtype == torch.bfloat16 else a, _bits(b) if b.dtype == torch.bfloat16 else b)


def test_cluster_positions_are_the_taken_members_back_to_back():
    H, C, S, M, budget = 3, 20, 4, 3, 25
    pool, order, sizes, csum, slabs, W, slots, N, sizes_raw, slabs_raw, order_raw = _case(H, C, S, M, budget, 1, False, "cpu")
    rows, starts = cluster_positions(order, sizes, csum, slabs, budget, W, S)
    for h in range(H):
        want, total = [], 0
        for c in order_raw[h].tolist():  # best-first, stop at the first cluster that does not fit
            n = int(sizes_raw[h, c])
            if total + n > budget:
                break
            total += n
            want += [int(slabs_raw[h, c, m // S]) * S + m % S for m in range(n)]
        got = rows[h][rows[h] >= 0].tolist()
        assert got == want and (rows[h][len(want):] == -1).all()
        assert int(starts[h].sum()) == sum(-(-int(sizes_raw[h, c]) // S) for c in order_raw[h].tolist()[: _taken(sizes_raw[h], order_raw[h], budget)])


def _taken(sizes, order, budget):
    total = 0
    for i, c in enumerate(order.tolist()):
        if total + int(sizes[c]) > budget:
            return i
        total += int(sizes[c])
    return len(order)


def test_reference_counts_tokens_and_slab_reads():
    H, C, S, M, budget = 2, 10, 4, 2, 30
    pool, order, sizes, csum, slabs, W, slots, N, *_ = _case(H, C, S, M, budget, 2, False, "cpu")
    k = torch.zeros(N, H, 64, dtype=torch.bfloat16)
    v, valid, counts = torch.zeros_like(k), torch.zeros(N, H, dtype=torch.bool), torch.zeros(5, dtype=torch.int64)
    gather_clusters_reference(pool, order, sizes, csum, slabs, budget, slots, k, v, valid, counts)
    rows, starts = cluster_positions(order, sizes, csum, slabs, budget, W, S)
    assert counts.tolist() == [int((rows >= 0).sum()), int(starts.sum()), int((rows >= 0).sum()), 0, 0]
    assert torch.equal(valid[slots], (rows >= 0).T)
