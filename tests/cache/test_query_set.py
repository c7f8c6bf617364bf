"""Scoring by every query (`CacheConfig.scoring="max"`): the estimate against its formula, blocks
against one pass, and what it is for: a unit one query head looks at, which the mean query misses."""

import pytest
import torch

from mosaic_ray.cache import query_set as qs_mod
from mosaic_ray.cache.query_set import QuerySet, bound_logits, mean_query, query_set


def _reference(q, log_z_res, reps, sizes):
    """max_q (q . rep - log Z_q), Z_q = exp(log_z_res) + sum_n size_n exp(q . rep_n); float64."""
    q, reps = q.double(), reps.double()
    logits = torch.einsum("hqd,hnd->hnq", q, reps)
    w = torch.ones_like(logits[..., 0]) if sizes is None else sizes.double()
    z = log_z_res.double().exp() + (w[..., None] * logits.exp()).sum(1)
    s = (logits - z.log()[:, None, :]).amax(2)
    return s if sizes is None else s.masked_fill(sizes <= 0, float("-inf"))


@pytest.mark.parametrize("sized", [False, True])
def test_unit_scores_follow_the_formula_in_blocks_or_at_once(monkeypatch, sized):
    g = torch.Generator().manual_seed(0)
    H, Q, N, D = 2, 6, 37, 8
    q = torch.randn(H, Q, D, generator=g) * 0.5
    reps = torch.randn(H, N, D, generator=g)
    log_z = torch.randn(H, Q, generator=g)
    sizes = torch.randint(0, 5, (H, N), generator=g) if sized else None
    want = _reference(q, log_z, reps, sizes)
    once = QuerySet(q, log_z).unit_scores(reps, sizes)
    monkeypatch.setattr(qs_mod, "SCORE_BLOCK_ELEMS", H * Q * 5)  # blocks of 5 units
    blocked = QuerySet(q, log_z).unit_scores(reps, sizes)
    torch.testing.assert_close(once.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked, once, rtol=1e-6, atol=1e-6)


def test_one_query_ranks_as_its_dot_product():
    g = torch.Generator().manual_seed(1)
    q, reps = torch.randn(3, 1, 16, generator=g), torch.randn(3, 50, 16, generator=g)
    got = QuerySet(q, torch.zeros(3, 1)).unit_scores(reps)
    dots = torch.einsum("hd,hnd->hn", q[:, 0], reps)
    assert torch.equal(torch.argsort(got, 1), torch.argsort(dots, 1))


def test_a_unit_one_head_attends_outranks_what_the_mean_query_favours():
    """Group of 4 query heads: head 0 points at unit 0; the others weakly at unit 1. The mean
    query picks unit 1, the query set unit 0 (head 0 gives it most of its attention)."""
    D = 8
    e = torch.eye(D)
    reps = torch.stack([e[0], e[1], e[2]])[None] * 4.0  # [1, 3, D]
    heads = torch.stack([e[0] * 2.0, e[1] * 0.9 + e[3], e[1] * 0.9 - e[3], e[1] * 0.9 + e[4]])  # [4, D]
    q = heads[None, :, None, :].expand(1, 4, 1, D).reshape(1, 4, D)  # one token, Hq = 4 -> [T=1, Hq=4, D]
    mean = mean_query(q.reshape(1, 4, D), 1)
    assert int(torch.argmax(reps[0] @ mean[0])) == 1
    qset = query_set(q.reshape(1, 4, D), torch.zeros(1, 0, D), 1.0, 1)
    assert qset.shape == (1, 4, D)
    assert int(torch.argmax(qset.unit_scores(reps)[0])) == 0


def test_a_bound_is_at_least_every_members_logit_and_exact_for_a_point():
    g = torch.Generator().manual_seed(3)
    H, Q, D, M = 2, 5, 8, 9
    q = torch.randn(H, Q, D, generator=g)
    members = torch.randn(H, M, D, generator=g)
    lo, hi = members.amin(1, keepdim=True), members.amax(1, keepdim=True)  # one unit of M members
    bound = bound_logits(q, lo, hi)[:, 0]  # [H, Q]
    assert bool((bound >= torch.einsum("hqd,hmd->hqm", q, members).amax(2) - 1e-5).all())
    torch.testing.assert_close(bound_logits(q, members[:, :1], members[:, :1])[:, 0], torch.einsum("hqd,hd->hq", q, members[:, 0]))


def test_query_set_scales_and_groups_the_heads():
    T, Hq, H, D = 3, 4, 2, 5
    q = torch.randn(T, Hq, D)
    k_res = torch.randn(H, 7, D)
    s = query_set(q, k_res, 0.5, H)
    assert s.q.shape == (H, T * Hq // H, D)
    # KV head 1 serves query heads 2 and 3; entry (t, j) of its set is token t's head 2 + j
    torch.testing.assert_close(s.q[1, 1], 0.5 * q[0, 3])
    torch.testing.assert_close(s.log_z[1, 1], torch.logsumexp(k_res[1] @ (0.5 * q[0, 3]), 0))


def test_mass_is_each_units_attention_averaged_over_the_queries():
    """reduce="mass" with exact keys: exp(score) is the true softmax mass of each past token under
    every query (Z over resident + past), averaged over the queries: what an exact top-B by true
    attention ranks by (the needle harness's oracle)."""
    g = torch.Generator().manual_seed(3)
    H, Q, N, R, D = 2, 5, 23, 7, 8
    q = torch.randn(H, Q, D, generator=g)
    k_res, past = torch.randn(H, R, D, generator=g), torch.randn(H, N, D, generator=g)
    probs = torch.softmax(torch.einsum("hqd,hnd->hqn", q.double(), torch.cat([k_res, past], 1).double()), 2)
    want = probs[:, :, R:].mean(1)  # [H, N]
    log_z = torch.logsumexp(torch.einsum("hqd,hrd->hqr", q, k_res), 2)
    got = QuerySet(q, log_z, "mass").unit_scores(past).double().exp()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the same queries through query_set (one token per query head, scale 1)
    qs = query_set(q.permute(1, 0, 2), k_res, 1.0, H, "mass")
    assert qs.reduce == "mass"


def test_spread_estimates_a_clusters_mean_attention_better_than_its_centroid():
    """Members spread around a centroid: q . c underestimates log mean exp(q . k) (Jensen); adding
    |q|^2 var / 2 per dimension (the normal's correction) lands near it."""
    g = torch.Generator().manual_seed(5)
    D, M, sigma = 16, 4000, 0.6
    c = torch.randn(1, 1, D, generator=g)
    members = c[0] + sigma * torch.randn(M, D, generator=g)
    q = torch.randn(1, 1, D, generator=g)
    truth = torch.logsumexp(members @ q[0, 0], 0) - torch.log(torch.tensor(float(M)))
    far = torch.full((1, 1), -1e4)  # no resident tokens to speak of: the partition is the unit's own
    plain = QuerySet(q, far).unit_scores(c, torch.ones(1, 1))
    spread = QuerySet(q, far).unit_scores(c, torch.ones(1, 1), spread=torch.full((1, 1), sigma ** 2))
    est_plain = float(c[0, 0] @ q[0, 0])
    est_spread = est_plain + 0.5 * float((q * q).sum()) * sigma ** 2
    assert abs(est_spread - float(truth)) < 0.2 * abs(est_plain - float(truth))
    # a lone unit takes all of its own partition: both score log 1 = 0 whatever the estimate
    assert float(plain) == pytest.approx(0.0, abs=1e-5) and float(spread) == pytest.approx(0.0, abs=1e-5)


def test_spread_enters_the_partition_and_the_score():
    g = torch.Generator().manual_seed(6)
    H, Q, N, D = 2, 3, 9, 8
    q = torch.randn(H, Q, D, generator=g)
    reps = torch.randn(H, N, D, generator=g)
    log_z = torch.randn(H, Q, generator=g)
    sizes = torch.randint(1, 5, (H, N), generator=g)
    spread = torch.rand(H, N, generator=g)
    got = QuerySet(q, log_z).unit_scores(reps, sizes, spread=spread).double()
    logits = torch.einsum("hqd,hnd->hnq", q.double(), reps.double()) + 0.5 * (q.double() ** 2).sum(-1)[:, None, :] * spread.double()[..., None]
    z = log_z.double().exp() + (sizes.double()[..., None] * logits.exp()).sum(1)
    torch.testing.assert_close(got, (logits - z.log()[:, None, :]).amax(2), rtol=1e-5, atol=1e-5)
