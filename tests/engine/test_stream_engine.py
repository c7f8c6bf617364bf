"""StreamEngine behaviour: migration snapshots, bad input, async answers, deferral, memory bound."""

import asyncio

import numpy as np
import torch
import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest, InvalidInputError, StreamExistsError, UnknownStreamError

Q = AskRequest("Describe the scene.", max_tokens=8)


@pytest.mark.parametrize("method", ["full", "frame", "token", "cluster"])
def test_export_import_gives_identical_answers(tiny_adapter, method):
    src = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    dst = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    dst.open_stream("other")  # the target pool already holds slabs: ids must be remapped
    dst.append_frames("other", frames(5, seed=7), [float(i) for i in range(5)])
    src.open_stream("s")
    src.append_frames("s", frames(8, seed=4), [float(i) for i in range(8)])
    src.append_text("s", "a red car passes", 8.5)
    dst.import_stream("s", src.export_stream("s"))
    assert dst.answer("s", Q).token_ids == src.answer("s", Q).token_ids
    assert dst.stream_info("s")["tokens"] == src.stream_info("s")["tokens"]



@pytest.mark.parametrize("method", ["cluster", "token"])
def test_an_import_without_room_is_an_overload_and_leaves_nothing_behind(tiny_adapter, method):
    """A snapshot the host pool cannot hold is capacity (503, try later or elsewhere), not a bad
    snapshot: no stream, every slab and device slot given back; with room, the same import works."""
    from mosaic_ray.engine.interface import OverloadedError

    src = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    src.open_stream("s")
    src.append_frames("s", frames(12, seed=4), [float(i) for i in range(12)])
    snap = src.export_stream("s")
    dst = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    pool = dst.pool
    need = snap["tensors"]["pool.slab_ids"].numel()
    assert 0 < need <= pool.free_slabs
    hog = pool.register_owner()
    taken = pool.allocate(pool.free_slabs - need + 1, hog)  # one slab short
    free_slabs, free_slots = pool.free_slabs, dst.kv_pool.free_slots
    with pytest.raises(OverloadedError, match="no room"):
        dst.import_stream("s", snap)
    assert not dst.has_stream("s")
    assert (pool.free_slabs, dst.kv_pool.free_slots) == (free_slabs, free_slots)
    pool.free(taken)
    dst.import_stream("s", snap)
    assert dst.answer("s", Q).token_ids == src.answer("s", Q).token_ids

def test_bad_inputs_leave_stream_unchanged(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    engine.open_stream("s")
    engine.append_frames("s", frames(3), [0.0, 1.0, 2.0])
    before = engine.stream_info("s")
    bad_calls = [
        lambda: engine.append_frames("s", [], []),
        lambda: engine.append_frames("s", [np.zeros((56, 56), np.uint8)], [3.0]),
        lambda: engine.append_frames("s", [np.zeros((56, 56, 3), np.float32)], [3.0]),
        lambda: engine.append_frames("s", frames(1), [float("nan")]),
        lambda: engine.append_frames("s", frames(1), [1.0]),  # goes back in time
        lambda: engine.append_frames("s", frames(2), [3.0]),
        lambda: engine.append_text("s", "   ", 3.0),
        lambda: engine.answer("s", AskRequest("x" * 5000, max_tokens=4)),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidInputError):
            call()
    assert engine.stream_info("s") == before
    with pytest.raises(UnknownStreamError):
        engine.append_frames("nope", frames(1), [0.0])
    with pytest.raises(StreamExistsError):
        engine.open_stream("s")
    with pytest.raises(ValueError):
        AskRequest("", max_tokens=4)


def _engine_and_twin(tiny_adapter):
    """Two engines holding the same stream "s" (6 frames): one to ask, one to answer plainly."""
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    twin = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    for e in (engine, twin):
        e.open_stream("s")
        e.append_frames("s", frames(6, seed=5), [float(i) for i in range(6)])
    return engine, twin


def test_async_ask_streams_the_same_answer(tiny_adapter):
    engine, twin = _engine_and_twin(tiny_adapter)

    async def collect():
        return "".join([d async for d in engine.ask("s", Q)])

    assert asyncio.run(collect()) == twin.answer("s", Q).text


def test_an_asker_that_reads_late_gets_the_text_so_far_in_one_delta(tiny_adapter):
    engine, twin = _engine_and_twin(tiny_adapter)

    async def collect():
        it = engine.ask("s", Q).__aiter__()
        first = await it.__anext__()
        while engine.loop.has_work():  # the answer finishes while nobody reads
            await asyncio.sleep(0.01)
        return [first] + [d async for d in it]

    deltas, want = asyncio.run(collect()), twin.answer("s", Q)
    assert "".join(deltas) == want.text
    assert len(want.token_ids) > 2 and len(deltas) == 2  # the first, then all the rest at once


def test_batched_questions_match_single(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    single = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    for e in (engine, single):
        for i, sid in enumerate(("a", "b")):
            e.open_stream(sid)
            e.append_frames(sid, frames(4 + i, seed=10 + i), [float(t) for t in range(4 + i)])
    q2 = AskRequest("Who is there? Answer briefly please.", max_tokens=6)
    together = engine.answer_batch([("a", Q), ("b", q2)])
    assert [a.token_ids for a in together] == [single.answer("a", Q).token_ids, single.answer("b", q2).token_ids]


def test_frames_during_a_question_are_deferred_then_ingested(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    engine.open_stream("s")
    engine.append_frames("s", frames(2), [0.0, 1.0])
    run = engine._start("s", Q)
    assert engine.append_frames("s", frames(1, seed=3), [2.0]) == 3
    assert engine.stream_info("s")["deferred_frames"] == 1
    while run.phase != "done":
        engine._advance([run])
    info = engine.stream_info("s")
    assert info["frames"] == 3 and info["deferred_frames"] == 0 and info["questions"] == 1


def test_device_memory_is_bounded_for_cluster(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=32, sink=4, budget=30)
    engine.open_stream("s")
    sizes = []
    for i in range(12):
        engine.append_frames("s", frames(2, seed=i), [2.0 * i, 2.0 * i + 1])
        sizes.append(engine.stream_info("s")["resident_tokens"])
    assert max(sizes[4:]) <= 36 and engine.stream_info("s")["kv_bytes_host"] > 0


def test_time_range_question(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    engine.open_stream("s")
    engine.append_frames("s", frames(8), [float(i) for i in range(8)])
    ans = engine.answer("s", AskRequest("What happened early on?", max_tokens=4, since=0.0, until=2.0))
    assert ans.fetched_tokens > 0 and ans.finish_reason in ("stop", "length")


@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
def test_prefetch_gives_identical_answers(tiny_adapter, method):
    answers = {}
    for prefetch in (False, True):
        engine = make_engine(tiny_adapter, method, window=24, sink=4, budget=30, engine={"prefetch": prefetch})
        engine.open_stream("s")
        engine.append_frames("s", frames(10, seed=3), [float(i) for i in range(10)])
        answers[prefetch] = engine.answer("s", Q)
    assert answers[True].token_ids == answers[False].token_ids
    assert answers[False].prefetch_hit_rate is None
    rate = answers[True].prefetch_hit_rate
    assert rate is None or 0.0 <= rate <= 1.0


def test_one_snapshot_imports_twice_independently(tiny_adapter):
    src = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    src.open_stream("s")
    src.append_frames("s", frames(8, seed=4), [float(i) for i in range(8)])
    snap = src.export_stream("s")
    a = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    b = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    a.import_stream("s", snap)
    first = a.answer("s", Q).token_ids
    a.append_frames("s", frames(4, seed=9), [8.0, 9.0, 10.0, 11.0])  # mutates a's copy in place
    b.import_stream("s", snap)
    assert b.answer("s", Q).token_ids == first


def test_a_snapshot_keeps_the_text_units_and_an_older_one_without_them_still_imports(tiny_adapter):
    src = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    src.open_stream("s")
    src.append_frames("s", frames(8, seed=4), [float(i) for i in range(8)])
    src.append_text("s", "a red car passes the gate", 8.5)
    src.append_frames("s", frames(6, seed=5), [9.0 + i for i in range(6)])
    snap = src.export_stream("s")
    ix = src.streams["s"].cache.retriever.index
    assert ix.text_slot.shape[1] > 0  # the prompt's and the caption's tokens are text units
    dst = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    dst.import_stream("s", snap)
    got = dst.streams["s"].cache.retriever.index
    assert torch.equal(got.text_slot, ix.text_slot) and torch.equal(got.text_keys, ix.text_keys)
    assert dst.answer("s", Q).token_ids == src.answer("s", Q).token_ids
    since_text = ("index.text_keys", "index.text_slot", "resident.text")
    older = {"meta": snap["meta"], "tensors": {k: v for k, v in snap["tensors"].items() if not k.endswith(since_text)}}
    legacy = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    legacy.import_stream("s", older)
    assert legacy.streams["s"].cache.retriever.index.text_slot.shape[1] == 0
    assert len(legacy.answer("s", Q).token_ids) > 0


def test_key_bounds_travel_in_snapshots_and_a_snapshot_without_them_imports(tiny_adapter):
    bound = {"representative": "bound"}
    src = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, cluster=bound)
    plain = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30)
    for e in (src, plain):
        e.open_stream("s")
        e.append_frames("s", frames(10, seed=6), [float(i) for i in range(10)])
    dst = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, cluster=bound)
    dst.import_stream("s", src.export_stream("s"))
    a, b = src.streams["s"].cache.retriever.index, dst.streams["s"].cache.retriever.index
    assert a.bounded and b.bounded and torch.equal(a.kmin, b.kmin) and torch.equal(a.kmax, b.kmax)
    assert dst.answer("s", Q).token_ids == src.answer("s", Q).token_ids
    # from an engine that keeps no bounds: each cluster's bound starts as its centroid
    late = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, cluster=bound)
    late.import_stream("s", plain.export_stream("s"))
    ix = late.streams["s"].cache.retriever.index
    assert ix.bounded and torch.equal(ix.kmin, ix.centroid) and len(late.answer("s", Q).token_ids) > 0
