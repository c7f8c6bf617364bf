"""Placement and rebalancing decisions (pure functions of load reports)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_ray.runtime.config import LoadWeights
from mosaic_ray.runtime.actors.load import GIB, LoadReport, StreamLoad, least_loaded, plan_moves

W = LoadWeights()


def _streams(n: int, prefix: str = "s", kv_gib: float = 0.0) -> list[StreamLoad]:
    return [StreamLoad(f"{prefix}{i}", int(kv_gib * GIB)) for i in range(n)]


def test_least_loaded_breaks_ties_by_name():
    assert least_loaded({"b": 1.0, "a": 1.0, "c": 2.0}) == "a"
    assert least_loaded({"b": 0.5, "a": 1.0}) == "b"


def test_report_score_weights_every_term():
    r = LoadReport("x", streams=2, kv_bytes_device=int(GIB), kv_bytes_host=int(GIB), ingest_fps=4, queries_per_s=1)
    assert r.score(W) == 2 * W.stream + 2 * W.kv_gib + 4 * W.ingest_fps + W.queries_per_s


def test_skewed_shards_are_evened_out():
    streams = {"a": _streams(4), "b": []}
    scores = {"a": 4.0, "b": 0.0}
    moves = plan_moves(scores, streams, W, skew_ratio=1.5, min_score=1.0, max_moves=8)
    assert [(m.source, m.target) for m in moves] == [("a", "b"), ("a", "b")]


def test_balanced_or_indivisible_load_is_left_alone():
    assert plan_moves({"a": 2.0, "b": 2.0}, {"a": _streams(2), "b": _streams(2, "t")}, W, 1.5, 1.0, 8) == []
    # One stream cannot be split: moving it would only swap the skew.
    assert plan_moves({"a": 1.0, "b": 0.0}, {"a": _streams(1), "b": []}, W, 1.5, 1.0, 8) == []


def test_the_stream_nearest_half_the_gap_moves():
    # Scores 1, 1, 1 and 5 (a stream with 4 x 29 GiB of KV): the gap is 8, the 5 is nearest 4.
    heavy = [*_streams(3), StreamLoad("long", int(4 * 29 * GIB))]
    scores = {"a": sum(s.score(W) for s in heavy), "b": 0.0}
    moves = plan_moves(scores, {"a": heavy, "b": []}, W, 1.5, 1.0, 1)
    assert [m.stream_id for m in moves] == ["long"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(0, 50), max_size=8), min_size=2, max_size=5),
    st.floats(1.0, 3.0),
)
def test_every_move_lowers_the_pair_maximum_and_keeps_the_total(shard_streams, ratio):
    streams = {
        f"sh{i}": [StreamLoad(f"sh{i}-{j}", int(g / W.kv_gib * GIB)) for j, g in enumerate(gibs)]
        for i, gibs in enumerate(shard_streams)
    }
    scores = {name: sum(s.score(W) for s in ss) for name, ss in streams.items()}
    total = sum(scores.values())
    moves = plan_moves(scores, streams, W, ratio, 1.0, 10)
    current = dict(scores)
    by_id = {s.stream_id: s for ss in streams.values() for s in ss}
    for m in moves:
        before = max(current[m.source], current[m.target])
        load = by_id[m.stream_id].score(W)
        current[m.source] -= load
        current[m.target] += load
        assert max(current[m.source], current[m.target]) < before
    assert abs(sum(current.values()) - total) < 1e-6 * max(1.0, total)
