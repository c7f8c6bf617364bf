"""The benchmarks' small statistics against known values."""

import pytest

from scaling_bench.harness.stats import mcnemar_exact, wilson


@pytest.mark.parametrize("k,n,lo,hi", [(9, 10, 0.5958, 0.9821), (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                       (40, 40, 0.9124, 1.0)])
def test_wilson_interval(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_of_nothing_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("a,b,p", [(0, 0, 1.0), (5, 0, 0.0625), (0, 5, 0.0625), (6, 1, 0.125), (10, 2, 0.0386),
                                   (3, 3, 1.0)])
def test_exact_mcnemar_against_the_binomial(a, b, p):
    # 5 vs 0: 2 / 2**5; 6 vs 1: 2 * 8 / 128; 10 vs 2: 2 * 79 / 4096
    assert mcnemar_exact(a, b) == pytest.approx(p, abs=1e-4)
