"""mosaic_ray.bounds: the one definition of what a client value must be (issue 20)."""

from __future__ import annotations

import math

import pytest

from mosaic_ray.bounds import (
    MAX_SEQ,
    MAX_TIME_S,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    check_frame_record,
    check_stream_id,
    check_text_record,
    greedy_below_floor,
    is_stream_id,
    top_p_floor,
)

BAD_IDS = ["cam-1\n", "cam-1\r", "cam\n-1", "\ncam", "cam-1\x00", "cam-1\t", "", "-cam", "a" * 129, "cam/1",
           "cam 1", "\u202ecam"]


@pytest.mark.parametrize("sid", BAD_IDS)
def test_a_control_character_or_newline_is_no_stream_id(sid):
    assert not is_stream_id(sid)
    with pytest.raises(ValueError):
        check_stream_id(sid)


@pytest.mark.parametrize("sid", ["cam-1", "tenant:cam.1", "a" * 128, "0"])
def test_stream_ids(sid):
    assert is_stream_id(sid) and check_stream_id(sid) == sid


def test_floors_of_temperature_and_top_p():
    assert greedy_below_floor(1e-39) == greedy_below_floor(MIN_TEMPERATURE / 2) == 0.0
    assert greedy_below_floor(MIN_TEMPERATURE) == MIN_TEMPERATURE and greedy_below_floor(0.7) == 0.7
    assert top_p_floor(1e-46) == top_p_floor(5e-324) == MIN_TOP_P and top_p_floor(0.9) == 0.9


@pytest.mark.parametrize("seq,ts", [(MAX_SEQ + 1, [0.0]), (-1, [0.0]), (True, [0.0]), (None, [1e300]),
                                    (None, [math.nan]), (None, [math.inf]), (None, [-1.0]), (None, []),
                                    (0, [1.0, MAX_TIME_S * 2])])
def test_a_frame_record_out_of_bounds_is_refused(seq, ts):
    with pytest.raises(ValueError):
        check_frame_record(seq, ts)


def test_frame_and_text_records_in_bounds_pass():
    check_frame_record(MAX_SEQ, [0.0, MAX_TIME_S])
    check_frame_record(None, [5])
    check_text_record("a caption\twith\nnewlines", 3.0)


@pytest.mark.parametrize("text,ts", [("nul\x00", 1.0), ("", 1.0), ("x", 1e300), ("\ud800", 1.0), ("x" * 11, 1.0)])
def test_a_text_record_out_of_bounds_is_refused(text, ts):
    with pytest.raises(ValueError):
        check_text_record(text, ts, max_chars=10)
