"""Token buckets and per-tenant limits (`serve/limits.py`) on a fake clock: rate, burst, debt,
all-or-nothing charges, refunds, and a replica's share."""

from __future__ import annotations

import pytest

from mosaic_ray.serve.config import AuthSpec
from mosaic_ray.serve.errors import RateLimitedError
from mosaic_ray.serve.limits import TenantLimiter, TokenBucket, question_cost


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


SPEC = AuthSpec(limits={"frames_per_s": 10, "bytes_per_s": 1000, "burst_s": 1},
                tenants={"free": {}})


def test_bucket_grants_its_rate_after_its_burst():
    clock = Clock()
    b = TokenBucket(10, 10, clock)
    assert b.wait_s(10) == 0
    b.take(10)
    assert b.wait_s(1) == pytest.approx(0.1)
    clock.t = 0.5
    assert b.wait_s(5) == 0 and b.wait_s(6) == pytest.approx(0.1)


def test_a_request_larger_than_the_bucket_passes_from_full_and_leaves_debt():
    clock = Clock()
    b = TokenBucket(10, 10, clock)
    assert b.wait_s(30) == 0  # never refused forever
    b.take(30)
    assert b.wait_s(1) == pytest.approx(2.1)  # 20 of debt + 1: the long-run rate holds


def test_charges_are_all_or_nothing_and_refunds_give_back():
    clock = Clock()
    lim = TenantLimiter(SPEC, clock=clock)
    lim.charge("t", frames=5, nbytes=900)
    with pytest.raises(RateLimitedError) as over:
        lim.charge("t", frames=1, nbytes=200)  # bytes are short; frames must not be taken either
    assert "bytes" in str(over.value) and over.value.retry_after_s == pytest.approx(0.1)
    lim.charge("t", frames=5, nbytes=100)  # all 10 frames were still there
    with pytest.raises(RateLimitedError):
        lim.charge("t", frames=1)
    lim.refund("t", frames=3)
    lim.charge("t", frames=3)


def test_tenants_are_separate_and_unlimited_ones_are_free():
    lim = TenantLimiter(SPEC, clock=Clock())
    lim.charge("a", frames=10)
    lim.charge("b", frames=10)  # b has its own bucket
    for _ in range(100):
        lim.charge("free", frames=1000, nbytes=10**9)
        lim.charge(None, frames=1000)  # the admin / auth off


def test_a_replica_grants_its_share_of_the_rate():
    clock = Clock()
    lim = TenantLimiter(SPEC, share=0.5, clock=clock)
    lim.charge("a", frames=5)
    with pytest.raises(RateLimitedError) as over:
        lim.charge("a", frames=5)
    assert over.value.retry_after_s == pytest.approx(1.0)  # 5 frames at 10 x 0.5 per second


def test_questions_draw_on_their_own_budget():
    spec = AuthSpec(limits={"question_tokens_per_s": 100, "burst_s": 1})
    clock = Clock()
    lim = TenantLimiter(spec, clock=clock)
    cost = question_cost({"question": "x" * 41, "max_tokens": 50})
    assert cost == 11 + 50
    lim.charge("t", question_tokens=cost)
    with pytest.raises(RateLimitedError) as over:
        lim.charge("t", question_tokens=cost)
    assert "question tokens" in str(over.value) and over.value.retry_after_s == pytest.approx(0.22)
    lim.charge("t", frames=1000, nbytes=10**9)  # no frame or byte limit configured
    lim.refund("t", question_tokens=cost)
    lim.charge("t", question_tokens=cost)
