"""record_check: what a logged record (or a live append's times) must satisfy to reach an engine."""

from __future__ import annotations

import math

import pytest

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.durability.frame_log import FrameRecord, OpenRecord, TextRecord
from mosaic_ray.bounds import MAX_TIME_S as MAX_STREAM_TIME_S
from mosaic_ray.runtime.durability.record_check import check_record, check_times


@pytest.mark.parametrize("ts", [0.0, 1.5, MAX_STREAM_TIME_S])
def test_times_in_range_pass(ts):
    check_times([ts])
    check_record(TextRecord("note", ts))


@pytest.mark.parametrize("ts", [-1.0, 1e300, MAX_STREAM_TIME_S * 2, math.inf, math.nan, "5", None])
def test_times_out_of_range_or_not_numbers_fail(ts):
    with pytest.raises(InvalidInputError):
        check_times([ts])


def test_records_that_may_not_reach_an_engine():
    with pytest.raises(InvalidInputError):
        check_record(FrameRecord(0, (), (1.0,)))  # a timestamp without its frame
    with pytest.raises(InvalidInputError):
        check_record(TextRecord("a\x00b", 1.0))
    check_record(OpenRecord(0.0))
