"""Batched appends: a failure after some streams committed names them, and leaves the rest as they were."""

import pytest

from mosaic_ray.cache.host_pool import PoolExhaustedError
from mosaic_ray.engine.interface import BatchPartlyAppliedError, InvalidInputError, OverloadedError
from mosaic_ray.engine.interface import AskRequest
from tests.engine.engine_fixtures import frames, make_engine

Q = AskRequest("Describe the scene.", max_tokens=6)


def _fail_appends_of(engine, sid):
    cache = engine.streams[sid].cache

    def full(*args, **kwargs):
        raise PoolExhaustedError("HostPool full (test)")

    cache.adopt = full  # how a step's tokens enter a cache


def _view(engine, sid):
    s = engine.streams[sid]
    return (s.frames, s.tokens, s.clock, s.next_pos, s.cache.past_tokens + s.cache.resident_tokens)


@pytest.mark.parametrize("method", ["cluster", "token"])
def test_a_commit_failing_midway_names_the_streams_that_are_in(tiny_adapter, method):
    engine = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    ref = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    for sid in ("a", "b", "c"):
        engine.open_stream(sid)
        ref.open_stream(sid)
    _fail_appends_of(engine, "b")
    before = _view(engine, "b")
    items = [(sid, frames(2, seed=i), [0.0, 1.0]) for i, sid in enumerate(("a", "b", "c"))]
    with pytest.raises(BatchPartlyAppliedError) as info:
        engine.append_frames_batch(items)
    # a full host pool is an overload (a 503 at the shard), not a broken engine
    assert info.value.applied == {"a": 2} and isinstance(info.value.cause, OverloadedError)
    assert _view(engine, "b") == before and _view(engine, "c")[0] == 0
    # "a" holds exactly what a lone append gives; retrying it would go back in time
    ref.append_frames("a", frames(2, seed=0), [0.0, 1.0])
    assert _view(engine, "a") == _view(ref, "a")
    with pytest.raises(InvalidInputError, match="goes back"):
        engine.append_frames("a", frames(2, seed=0), [0.0, 1.0])
    # the streams that were not applied take the same frames again, and answer like the reference
    del engine.streams["b"].cache.adopt
    assert engine.append_frames_batch(items[1:]) == [2, 2]
    ref.append_frames_batch(items[1:])
    for sid in ("a", "b", "c"):
        assert engine.answer(sid, Q).text == ref.answer(sid, Q).text


def test_one_entry_raises_the_failure_itself_a_full_host_pool_as_an_overload(tiny_adapter):
    """A host pool that cannot take a stream's tokens is capacity, not a broken engine: the append
    raises OverloadedError (a 503 at the shard, which stays healthy) and changes nothing."""
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    engine.open_stream("a")
    _fail_appends_of(engine, "a")
    with pytest.raises(OverloadedError, match="HostPool full") as info:
        engine.append_frames("a", frames(2), [0.0, 1.0])
    assert isinstance(info.value.__cause__, PoolExhaustedError)
    assert engine.streams["a"].frames == 0 and engine.streams["a"].clock == 0.0
    del engine.streams["a"].cache.adopt  # room again: the cache's own method
    assert engine.append_frames("a", frames(2), [0.0, 1.0]) == 2


def test_a_deferred_stream_counts_as_applied_when_the_forward_fails(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    for sid in ("busy", "b"):
        engine.open_stream(sid)
    engine.append_frames("busy", frames(1), [0.0])
    engine._start("busy", Q)
    _fail_appends_of(engine, "b")
    with pytest.raises(BatchPartlyAppliedError) as info:
        engine.append_frames_batch([("busy", frames(1, seed=5), [1.0]), ("b", frames(1), [0.0])])
    assert info.value.applied == {"busy": 2}
    assert engine.stream_info("busy")["deferred_frames"] == 1 and engine.streams["b"].frames == 0


def test_the_deferral_bound_is_checked_before_any_stream_changes(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, engine={"max_deferred_frames": 1})
    for sid in ("busy", "b"):
        engine.open_stream(sid)
    engine.append_frames("busy", frames(1), [0.0])
    engine._start("busy", Q)
    with pytest.raises(OverloadedError):
        engine.append_frames_batch([("b", frames(1), [0.0]), ("busy", frames(2, seed=5), [1.0, 2.0])])
    assert engine.streams["b"].frames == 0 and engine.stream_info("busy")["deferred_frames"] == 0


def test_a_full_pool_during_splits_keeps_the_frames(tiny_adapter, monkeypatch):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    engine.open_stream("a")

    def full(max_work=None):
        raise PoolExhaustedError("HostPool full (test)")

    monkeypatch.setattr(engine.streams["a"].cache, "maintain", full)
    assert engine.append_frames("a", frames(3), [0.0, 1.0, 2.0]) == 3



@pytest.mark.parametrize("ts", [1e300, 2e9])
def test_a_time_past_the_bound_is_refused_and_changes_nothing(tiny_adapter, ts):
    """Issue 20: a frame or text at ts=1e300 once passed the engine's check (finite) and left the
    stream unable to answer; past `bounds.MAX_TIME_S` it is refused before anything changes."""
    engine = make_engine(tiny_adapter, "cluster")
    engine.open_stream("s")
    engine.append_frames("s", frames(1), [0.0])
    state = lambda: {k: engine.stream_info("s")[k] for k in ("tokens", "frames", "texts", "duration_s")}  # noqa: E731
    before = state()
    with pytest.raises(InvalidInputError):
        engine.append_frames("s", frames(1), [ts])
    with pytest.raises(InvalidInputError):
        engine.append_text("s", "late", ts)
    assert state() == before
    engine.append_frames("s", frames(1), [1.0])
    assert engine.answer("s", AskRequest("what?", max_tokens=2)).token_ids
