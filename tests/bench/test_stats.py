"""The benchmarks' small statistics against known values."""

import pytest

from mosaic_ray.bench.stats import wilson


@pytest.mark.parametrize("k,n,lo,hi", [(9, 10, 0.5958, 0.9821), (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                       (40, 40, 0.9124, 1.0)])
def test_wilson_interval(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_of_nothing_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)
