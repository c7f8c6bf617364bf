"""The engine's step loop (`submit_frames` + `ask` under the scheduler): budgets per step,
frames flowing during answers, maintenance off the question's step, no acknowledged frame lost."""

import asyncio

import pytest

from engine_fixtures import frames, make_engine, make_loop_engine as _engine
from mosaic_ray.engine.interface import AskRequest, InvalidInputError, OverloadedError

Q = AskRequest("Describe the scene.", max_tokens=8)


def _fail_first_ingest(e, monkeypatch) -> None:
    """The engine's first ingest forward raises; the later ones run."""
    real, failures = e._ingest_frames, []

    def flaky(ready):
        if not failures:
            failures.append(1)
            raise RuntimeError("device busy (test)")
        return real(ready)

    monkeypatch.setattr(e, "_ingest_frames", flaky)


def test_submitted_frames_are_ingested_under_the_encoder_budget(tiny_adapter):
    e = _engine(tiny_adapter, encoder_budget=2)
    e.open_stream("s")

    async def go():
        e.submit_frames("s", frames(5, seed=1), [float(i) for i in range(5)])
        assert e.stream_info("s")["deferred_frames"] == 5
        e.loop.step()  # the loop task has not run yet: one step by hand
        info = e.stream_info("s")
        while e.loop.has_work():  # ... and the task the submit started does the rest
            await asyncio.sleep(0.01)
        return info

    info = asyncio.run(go())
    assert info["frames"] == 2 and info["deferred_frames"] == 3
    assert e.stream_info("s")["frames"] == 5 and e.stream_info("s")["deferred_frames"] == 0


@pytest.mark.parametrize("method", ["cluster", "full"])
def test_an_answer_streamed_while_frames_arrive_is_the_sequential_answer(tiny_adapter, method):
    live, alone = _engine(tiny_adapter, method), _engine(tiny_adapter, method)
    for e in (live, alone):
        e.open_stream("s")
        e.append_frames("s", frames(6, seed=4), [float(i) for i in range(6)])
    want = alone.answer("s", Q).text
    late = frames(6, seed=9)

    async def go():
        async def ask():
            return "".join([d async for d in live.ask("s", Q)])

        task = asyncio.create_task(ask())
        for i, f in enumerate(late):
            await asyncio.sleep(0)
            live.submit_frames("s", [f], [6.0 + i])
        text = await task
        while live.loop.has_work():
            await asyncio.sleep(0.01)
        return text

    assert asyncio.run(go()) == want
    info = live.stream_info("s")
    assert info["frames"] == 12 and info["deferred_frames"] == 0 and info["questions"] == 1
    alone.append_frames("s", late, [6.0 + i for i in range(6)])
    assert info["tokens"] == alone.stream_info("s")["tokens"]


def test_splits_run_between_steps_not_inside_the_commit(tiny_adapter, monkeypatch):
    e = _engine(tiny_adapter)
    e.open_stream("s")
    calls = []
    real = e.streams["s"].cache.maintain
    monkeypatch.setattr(e.streams["s"].cache, "maintain", lambda n=None, offload=True: calls.append(("maintain", n)) or real(n, offload))
    real_ingest = e._ingest

    def ingest(work):
        calls.append(("ingest", len(work)))
        return real_ingest(work)

    monkeypatch.setattr(e, "_ingest", ingest)
    real_offload = e._offload_staged
    monkeypatch.setattr(e, "_offload_staged", lambda state: calls.append(("offload", real_offload(state))) or calls[-1][1])

    async def go():
        e.submit_frames("s", frames(3, seed=2), [0.0, 1.0, 2.0])
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert ("ingest", 1) in calls
    first_maintain = next(i for i, c in enumerate(calls) if c[0] == "maintain")
    # the loop's budget, after the ingest, less the one unit of the offload made just before it
    offloaded = calls[first_maintain - 1] == ("offload", True)
    assert calls[first_maintain][1] == e.config.scheduler.maintenance_budget - int(offloaded)
    assert e.loop.counters["ingest_frames"] == 3 and not e.loop.needs_maintenance


def test_tokens_leaving_the_window_are_offloaded_between_steps(tiny_adapter, monkeypatch):
    """The ingest forward only stages what leaves the window; the offload (the insert into the
    clusters) is the loop's background work, and every staged token ends up offloaded."""
    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, offload_batch=48)
    e.open_stream("s")
    cache, staged_after_ingest = e.streams["s"].cache, []
    real_ingest = e._ingest

    def ingest(work):
        out = real_ingest(work)
        staged_after_ingest.append((cache.staged_tokens, cache.retriever.past_tokens))
        return out

    monkeypatch.setattr(e, "_ingest", ingest)

    async def go():
        e.submit_frames("s", frames(6, seed=3), [float(i) for i in range(6)])
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert staged_after_ingest and all(st > 0 for st, _ in staged_after_ingest)  # the commit staged, never inserted
    assert staged_after_ingest[0][1] == 0
    c = e.loop.counters
    assert c["offloads"] >= 1 and c["offloaded_tokens"] == cache.retriever.past_tokens > 0
    assert cache.staged_tokens < e.config.cache.offload_batch  # what remains waits for a full batch


def test_the_offload_counts_as_busy_and_splits_do_not(tiny_adapter, monkeypatch):
    """The shard's capacity (`runtime/actors/capacity.py`) reads the engine's busy seconds: an offload is
    work every stream's frames need, so its time is in them; cluster splits refine in the time
    left and are not."""
    import time

    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, offload_batch=48)
    e.open_stream("s")
    cache = e.streams["s"].cache
    real_offload, real_maintain = cache.offload, cache.retriever.maintain
    seen = {"offload": [], "split": []}

    def slow_offload():  # 0.2 s each, measured against busy_s around it
        before = e.busy_s
        time.sleep(0.2)
        out = real_offload()
        seen["offload"].append(before)
        return out

    def slow_splits(n):
        before = e.busy_s
        time.sleep(0.2)
        seen["split"].append((before, n))
        return real_maintain(n)

    monkeypatch.setattr(cache, "offload", slow_offload)
    monkeypatch.setattr(cache.retriever, "maintain", slow_splits)
    busy_before_upkeep = []
    real_step_maintain = e.loop._maintain

    def maintain(sid, n, splits=True, offload=True):
        busy_before_upkeep.append(e.busy_s)
        return real_step_maintain(sid, n, splits=splits, offload=offload)

    monkeypatch.setattr(e.loop, "_maintain", maintain)

    async def go():
        e.submit_frames("s", frames(6, seed=3), [float(i) for i in range(6)])
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    offloads, split_calls = e.loop.counters["offloads"], len(seen["split"])
    assert offloads >= 1 and split_calls >= 1
    # every upkeep call's busy time: 0.2 s per offload, nothing for the splits' 0.2 s each
    upkeep_busy = e.busy_s - e.loop.counters["ingest_s"] - e.loop.counters["question_s"]
    assert 0.2 * offloads - 0.05 <= upkeep_busy < 0.2 * offloads + 0.1 * split_calls
    # the loop's own account: the offloads' share of its upkeep time
    c = e.loop.counters
    assert 0.2 * offloads - 0.05 <= c["offload_s"] < 0.2 * offloads + 0.1
    assert c["maintenance_s"] >= c["offload_s"] + 0.2 * split_calls - 0.05


def test_frames_that_fail_to_ingest_stay_queued(tiny_adapter, monkeypatch):
    e = _engine(tiny_adapter)
    e.open_stream("s")
    _fail_first_ingest(e, monkeypatch)

    async def go():
        e.submit_frames("s", frames(2, seed=3), [0.0, 1.0])
        e.loop.step()  # fails: the frames go back to the queue
        assert e.stream_info("s")["deferred_frames"] == 2 and e.stream_info("s")["frames"] == 0
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert e.stream_info("s")["frames"] == 2 and e.loop.counters["ingest_errors"] == 1


def test_submit_validates_and_bounds_the_queue(tiny_adapter):
    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, engine={"max_deferred_frames": 2})
    e.open_stream("s")

    async def go():
        e.submit_frames("s", frames(1, seed=1), [5.0])
        with pytest.raises(InvalidInputError, match="before the stream clock"):
            e.submit_frames("s", frames(1, seed=2), [4.0])  # behind the queued frame
        with pytest.raises(OverloadedError):
            e.submit_frames("s", frames(2, seed=3), [6.0, 7.0])
        assert e.stream_info("s")["deferred_frames"] == 1
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert e.stream_info("s")["frames"] == 1
    with pytest.raises(InvalidInputError, match="priority"):
        AskRequest("hi", priority="urgent")


def test_ingest_frames_returns_once_the_frames_are_in_and_shares_one_forward(tiny_adapter, monkeypatch):
    e = _engine(tiny_adapter)
    for sid in "ab":
        e.open_stream(sid)
    forwards, real = [], e._ingest_frames
    monkeypatch.setattr(e, "_ingest_frames", lambda ready: forwards.append(len(ready)) or real(ready))

    async def go():
        return await asyncio.gather(e.ingest_frames("a", frames(2, seed=1), [0.0, 1.0]),
                                    e.ingest_frames("b", frames(3, seed=2), [0.0, 1.0, 2.0]))

    assert asyncio.run(go()) == [2, 3]  # held, and ingested (not queued) when they return
    assert [e.streams[s].frames for s in "ab"] == [2, 3] and forwards[0] == 2


def test_a_failed_ingest_fails_its_waiting_sender_and_drops_only_its_frames(tiny_adapter, monkeypatch):
    e = _engine(tiny_adapter)
    e.open_stream("s")
    _fail_first_ingest(e, monkeypatch)

    async def go():
        first = asyncio.ensure_future(e.ingest_frames("s", frames(2, seed=3), [0.0, 1.0]))
        await asyncio.sleep(0)  # queued; the loop's first step fails it
        with pytest.raises(RuntimeError, match="device busy"):
            await first
        return await e.ingest_frames("s", frames(1, seed=4), [2.0])

    assert asyncio.run(go()) == 1  # the failed frames are not in; the next ones are
    assert e.stream_info("s")["frames"] == 1 and e.loop.counters["ingest_errors"] == 1


def test_a_question_a_text_and_a_snapshot_take_the_frames_queued_before_them(tiny_adapter):
    live, alone = _engine(tiny_adapter), _engine(tiny_adapter)
    for e in (live, alone):
        e.open_stream("s")
    shown = frames(5, seed=6)
    alone.append_frames("s", shown, [float(i) for i in range(5)])
    want = alone.answer("s", Q).text

    async def go():
        live.submit_frames("s", shown, [float(i) for i in range(5)])
        assert live.stream_info("s")["deferred_frames"] == 5  # not ingested: no step has run
        return "".join([d async for d in live.ask("s", Q)])

    assert asyncio.run(go()) == want  # the question saw the queued frames, as if appended first

    async def text_after_frames():
        live.submit_frames("s", frames(1, seed=7), [9.0])
        live.append_text("s", "a caption", 9.5)
        return live.streams["s"].frames

    assert asyncio.run(text_after_frames()) == 6  # the frame went in before the text

    async def snapshot_after_frames():
        live.submit_frames("s", frames(1, seed=8), [10.0])
        return live.export_stream("s")

    snap = asyncio.run(snapshot_after_frames())
    assert live.streams["s"].frames == 7 and live.stream_info("s")["deferred_frames"] == 0
    live.close_stream("s")
    live.import_stream("s", snap)
    assert live.streams["s"].frames == 7


def test_closing_a_stream_fails_its_waiting_senders(tiny_adapter):
    from mosaic_ray.engine.interface import UnknownStreamError

    e = _engine(tiny_adapter)
    e.open_stream("s")

    async def go():
        pending = asyncio.ensure_future(e.ingest_frames("s", frames(1, seed=1), [0.0]))
        await asyncio.sleep(0)
        e.close_stream("s")  # before the loop's step
        with pytest.raises(UnknownStreamError, match="closed"):
            await pending

    asyncio.run(go())


def test_splits_wait_while_work_waits_and_offloads_do_not(tiny_adapter):
    """maintenance_share 0: while frames wait, the upkeep offloads (device memory stays bounded)
    but leaves the splits for later; once nothing waits, they drain."""
    from mosaic_ray.config import ClusterConfig, SchedulerConfig
    from mosaic_ray.engine.scheduler import StepScheduler

    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, offload_batch=8,
                    cluster=ClusterConfig(split_size=2, max_size=4))
    e.loop.scheduler = StepScheduler(SchedulerConfig(maintenance_share=0.0, ingest_wait_s=0.0, encoder_budget=4))
    e.open_stream("s")
    index = e.streams["s"].cache.retriever.index

    async def go():
        e.submit_frames("s", frames(12, seed=4), [float(i) for i in range(12)])
        while e.streams["s"].deferred:  # frames wait at every step's upkeep
            e.loop.step()
        assert e.loop.counters["offloads"] >= 1 and e.loop.counters["splits"] == 0
        assert index.pending_splits() > 0
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert e.loop.counters["splits"] > 0 and index.pending_splits() == 0


def test_offload_turns_take_the_most_staged_and_every_urgent_stream(tiny_adapter):
    """Streams opened together fall due for their offload together: while work waits, one
    upkeep offloads the `offloads_per_step` streams with the most staged, plus every stream with
    twice a batch staged; with nothing waiting (or no limit), every due stream."""
    from types import SimpleNamespace as NS

    from mosaic_ray.config import SchedulerConfig
    from mosaic_ray.engine.scheduler import StepScheduler

    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, offload_batch=8)
    e.loop.scheduler = StepScheduler(SchedulerConfig(offloads_per_step=2))
    staged = {"a": 9, "b": 12, "c": 15, "d": 10, "e": 3}
    e.streams = {s: NS(cache=NS(offload_due=n >= 8, staged_tokens=n, config=NS(offload_batch=8))) for s, n in staged.items()}
    planned = dict.fromkeys(staged, 5)
    assert e.loop._offload_turns(planned, busy=True) == {"c", "b"}  # the most staged two
    e.streams["a"].cache.staged_tokens = 16  # twice a batch: urgent
    e.streams["d"].cache.staged_tokens = 18
    assert e.loop._offload_turns(planned, busy=True) == {"d", "a"}
    e.loop.scheduler = StepScheduler(SchedulerConfig(offloads_per_step=1))
    assert e.loop._offload_turns(planned, busy=True) == {"d", "a"}  # a beyond the limit: urgent
    assert e.loop._offload_turns(planned, busy=False) == {"a", "b", "c", "d"}  # nothing waits: all due
    e.loop.scheduler = StepScheduler(SchedulerConfig(offloads_per_step=0))
    assert e.loop._offload_turns(planned, busy=True) == {"a", "b", "c", "d"}
