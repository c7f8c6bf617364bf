"""The shard's meter: cumulative histogram buckets, and one question's figures from its admission
to its end (tokens, latencies, finished reasons, waiting/running)."""

from __future__ import annotations

import asyncio

import pytest

from mosaic_ray.engine.interface import AnswerEnd
from mosaic_ray.runtime.actors.shard_metrics import FINISHED_REASONS, Histogram, ShardMeter


def test_histogram_buckets_are_cumulative_and_count_every_observation():
    h = Histogram((0.1, 0.5, 1.0))
    for v in (0.05, 0.1, 0.3, 0.7, 2.0, 9.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap == {"bounds": [0.1, 0.5, 1.0], "counts": [2, 3, 4], "sum": pytest.approx(12.15), "count": 6}
    assert all(a <= b for a, b in zip(snap["counts"], snap["counts"][1:]))


def test_histogram_bounds_must_increase():
    with pytest.raises(ValueError):
        Histogram((0.5, 0.1))


def test_a_question_is_waiting_then_running_and_its_end_is_counted_once():
    m = ShardMeter(10.0, (0.1, 1.0))
    with m.question() as q:
        assert (m.waiting, m.running) == (1, 0)
        q.running()
        assert (m.waiting, m.running) == (0, 1)
        assert q.saw("hello") is not None and q.saw(" there") is not None
        q.saw(AnswerEnd("length", prompt_tokens=7, completion_tokens=3))
    snap = m.snapshot()
    assert (snap["requests_waiting"], snap["requests_running"]) == (0, 0)
    assert snap["prompt_tokens_total"] == 7 and snap["generation_tokens_total"] == 3
    assert snap["finished_total"] == {"stop": 0, "length": 1, "cancelled": 0, "error": 0}
    assert snap["ttft_s"]["count"] == snap["e2e_s"]["count"] == snap["tpot_s"]["count"] == 1
    assert snap["queries_total"] == 1


def test_questions_without_an_end_are_cancelled_or_failed_and_observe_no_latency():
    m = ShardMeter(10.0, (0.1,))
    with m.question():  # the asker went away while the question waited for its turn
        pass
    with pytest.raises(asyncio.CancelledError), m.question() as q:
        q.running()
        raise asyncio.CancelledError
    with pytest.raises(RuntimeError), m.question() as q:
        q.running()
        q.saw("partial")
        raise RuntimeError("the engine failed")
    with m.question() as q:  # an engine that counts no tokens: no token counters, no TPOT
        q.running()
        q.saw("x")
        q.saw(AnswerEnd())
    snap = m.snapshot()
    assert snap["finished_total"] == {"stop": 1, "length": 0, "cancelled": 2, "error": 1}
    assert set(snap["finished_total"]) == set(FINISHED_REASONS)
    assert (m.waiting, m.running) == (0, 0)
    assert snap["e2e_s"]["count"] == 1 and snap["ttft_s"]["count"] == 2 and snap["tpot_s"]["count"] == 0
    assert snap["prompt_tokens_total"] == snap["generation_tokens_total"] == 0
