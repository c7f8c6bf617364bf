"""The engine's step loop (`submit_frames` + `ask` under the scheduler): budgets per step,
frames flowing during answers, maintenance off the question's step, no acknowledged frame lost."""

import asyncio

import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest, InvalidInputError, OverloadedError

Q = AskRequest("Describe the scene.", max_tokens=8)


def _engine(tiny_adapter, method="cluster", **scheduler):
    e = make_engine(tiny_adapter, method, window=24, sink=4, budget=30)
    if scheduler:
        from mosaic_ray.config import SchedulerConfig
        from mosaic_ray.engine.scheduler import StepScheduler

        e.loop.scheduler = StepScheduler(SchedulerConfig(**scheduler))
    return e


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
    monkeypatch.setattr(e.streams["s"].cache, "maintain", lambda n=None: calls.append(("maintain", n)) or real(n))
    real_ingest = e._ingest

    def ingest(work):
        calls.append(("ingest", len(work)))
        return real_ingest(work)

    monkeypatch.setattr(e, "_ingest", ingest)

    async def go():
        e.submit_frames("s", frames(3, seed=2), [0.0, 1.0, 2.0])
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert ("ingest", 1) in calls
    first_maintain = next(i for i, c in enumerate(calls) if c[0] == "maintain")
    assert calls[first_maintain][1] == e.config.scheduler.maintenance_budget  # the loop's budget, after the ingest
    assert e.loop.counters["ingest_frames"] == 3 and not e.loop.needs_maintenance


def test_frames_that_fail_to_ingest_stay_queued(tiny_adapter, monkeypatch):
    e = _engine(tiny_adapter)
    e.open_stream("s")
    real = e._ingest_frames
    failures = []

    def flaky(ready):
        if not failures:
            failures.append(1)
            raise RuntimeError("device busy (test)")
        return real(ready)

    monkeypatch.setattr(e, "_ingest_frames", flaky)

    async def go():
        e.submit_frames("s", frames(2, seed=3), [0.0, 1.0])
        e.loop.step()  # fails: the frames go back to the queue
        assert e.stream_info("s")["deferred_frames"] == 2 and e.stream_info("s")["frames"] == 0
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert e.stream_info("s")["frames"] == 2 and e.loop.counters["ingest_errors"] == 1


def test_submit_validates_and_bounds_the_queue(tiny_adapter):
    e = _engine(tiny_adapter)
    e.config.max_deferred_frames = 2
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
