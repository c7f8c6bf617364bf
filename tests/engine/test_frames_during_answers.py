"""Frames keep flowing while a stream answers (issue 16, item 2): they wait only for the question's
prefill step, are then ingested while the answer decodes, the answer is the one the stream gave at
the question's start, and every frame and the Q/A are in the stream afterwards."""

import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest

Q = AskRequest("Describe the scene.", max_tokens=8)


def _stream(engine, n=6):
    engine.open_stream("s")
    engine.append_frames("s", frames(n, seed=4), [float(i) for i in range(n)])


@pytest.mark.parametrize("method", ["full", "token", "cluster"])
def test_frames_enter_during_the_answer_and_leave_it_unchanged(tiny_adapter, method):
    live = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    alone = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    for e in (live, alone):
        _stream(e)
    want = alone.answer("s", Q)

    run = live._start("s", Q)
    live._advance([run])  # the prefill step: the answer's context is fixed from here on
    late = frames(4, seed=9)
    for i, f in enumerate(late):  # one frame per decode step, each ingested at once
        assert live.append_frames("s", [f], [6.0 + i]) == 7 + i
        assert live.stream_info("s")["deferred_frames"] == 0
        if run.phase != "done":
            live._advance([run])
    while run.phase != "done":
        live._advance([run])
    got = run.answer()
    assert got.token_ids == want.token_ids and got.text == want.text
    info = live.stream_info("s")
    assert info["frames"] == 10 and info["questions"] == 1 and not info["busy"]
    # the same tokens as asking first and appending the frames after
    alone.append_frames("s", late, [6.0 + i for i in range(4)])
    assert info["tokens"] == alone.stream_info("s")["tokens"]
    # the frames came after the answer's reserved positions; a next question still works
    state = live.streams["s"]
    assert state.next_pos > int(state.cache.pos.max())
    assert live.answer("s", AskRequest("What now?", max_tokens=4)).finish_reason in ("stop", "length")


def test_frames_before_the_prefill_step_wait_for_it(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    _stream(engine)
    run = engine._start("s", Q)
    assert engine.append_frames("s", frames(1, seed=3), [6.0]) == 7
    assert engine.stream_info("s")["deferred_frames"] == 1
    engine._advance([run])  # prefill: then the waiting frame is ingested
    assert engine.stream_info("s")["deferred_frames"] == 0 and engine.stream_info("s")["frames"] == 7
    while run.phase != "done":
        engine._advance([run])


def test_a_question_alone_keeps_positions_contiguous(tiny_adapter):
    engine = make_engine(tiny_adapter, "full", window=4096)
    _stream(engine, 2)
    engine.answer("s", Q)
    state = engine.streams["s"]  # the Q/A's tokens end the stream: no reserved position is left unused
    assert state.next_pos == int(state.cache.pos.max()) + 1


def test_a_failed_question_gives_its_positions_back(tiny_adapter, monkeypatch):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    _stream(engine, 3)
    before = engine.streams["s"].next_pos
    run = engine._start("s", Q)

    def boom(*a, **k):
        raise RuntimeError("forward failed (test)")

    monkeypatch.setattr(engine.runner, "forward", boom)
    with pytest.raises(RuntimeError):
        engine._advance([run])
    engine._release(run)
    state = engine.streams["s"]
    assert state.next_pos == before and not state.busy and state.cache._holds == 0


def test_waiting_frames_that_fail_to_enter_stay_queued_and_the_answer_goes_on(tiny_adapter, monkeypatch):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    _stream(engine, 3)
    run = engine._start("s", Q)
    engine.append_frames("s", frames(2, seed=3), [3.0, 4.0])  # waits for the prefill step
    real = engine._ingest_frames
    monkeypatch.setattr(engine, "_ingest_frames", lambda ready: (_ for _ in ()).throw(RuntimeError("pool full (test)")))
    engine._advance([run])  # the prefill runs; the flush fails, the frames stay
    assert run.phase == "decode" and engine.stream_info("s")["deferred_frames"] == 2
    monkeypatch.setattr(engine, "_ingest_frames", real)
    # a later append queues behind them and brings them in, in order
    assert engine.append_frames("s", frames(1, seed=4), [5.0]) == 6
    state = engine.streams["s"]
    assert engine.stream_info("s")["deferred_frames"] == 0 and state.frames == 6
    assert float(state.cache.time.max()) == 5.0
    while run.phase != "done":
        engine._advance([run])
    assert engine.stream_info("s")["questions"] == 1
