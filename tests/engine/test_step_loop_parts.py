"""The parts of a step loop's step (plan, questions, the rest): a first token reaches its asker
before the step's ingest, and the calls the engine's thread gets between the parts (a question's
start, a stream closed) run there without breaking what follows."""

import asyncio

from engine_fixtures import frames, make_loop_engine as _engine
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.step_loop import finish

Q = AskRequest("Describe the scene.", max_tokens=8)


def test_a_first_token_reaches_its_asker_before_the_steps_ingest(tiny_adapter, monkeypatch):
    """The loop yields between a step's questions and its ingest: the asker has its first delta
    while the step's vision batch is still to run; the TTFT parts are counted."""
    e = _engine(tiny_adapter, ingest_wait_s=0.0)
    for sid in ("a", "b"):
        e.open_stream(sid)
        e.append_frames(sid, frames(3, seed=2), [0.0, 1.0, 2.0])
    got: list[str] = []
    seen_at_ingest: list[int] = []
    real = e._ingest_frames

    def ingest(ready):
        seen_at_ingest.append(len(got))
        return real(ready)

    monkeypatch.setattr(e, "_ingest_frames", ingest)

    async def go():
        async def ask():
            async for d in e.ask("a", Q):
                got.append(d)

        task = asyncio.create_task(ask())
        await asyncio.sleep(0)  # `ask` starts (no frames wait on "a": no ingest in its start)
        e.submit_frames("b", frames(2, seed=3), [3.0, 4.0])  # ingest planned in the prefill's step
        await task
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert seen_at_ingest and seen_at_ingest[0] >= 1, seen_at_ingest  # the first delta came before the ingest
    c = e.loop.counters
    assert c["first_tokens"] == 1 and c["ttft_prefill_s"] > 0 and c["ttft_queue_s"] >= 0
    parts = e.stats()["ttft_parts"]
    assert parts["n"] == 1 and parts["prefill"]["p99_ms"] > 0


def test_a_stream_closed_between_the_parts_of_a_step_is_skipped(tiny_adapter):
    e = _engine(tiny_adapter, ingest_wait_s=0.0)
    for sid in ("a", "b"):
        e.open_stream(sid)

    async def go():  # no await until the parts ran: the loop task the submits start waits
        e.submit_frames("a", frames(2, seed=5), [0.0, 1.0])
        e.submit_frames("b", frames(2, seed=6), [0.0, 1.0])
        plan, runs = e.loop._plan()
        assert set(plan.ingest) == {"a", "b"}
        e.loop._run_questions(runs)
        e.close_stream("a")  # what another call may do while the loop yields
        finish(e.loop._rest(plan))
        assert "a" not in e.streams and e.stream_info("b")["frames"] == 2

    asyncio.run(go())


def test_calls_queued_during_an_ingest_run_before_the_steps_upkeep(tiny_adapter, monkeypatch):
    """The loop pauses after a step's ingest: a call the engine's thread got meanwhile (a
    question's start, frames handed over) runs then, not after the step's upkeep."""
    e = _engine(tiny_adapter, ingest_wait_s=0.0)
    e.open_stream("a")
    order: list[str] = []
    real_ingest, real_maintain = e._ingest_frames, e.loop._maintain

    def ingest(ready):
        asyncio.get_running_loop().call_soon(order.append, "call")  # queued while the step runs
        order.append("ingest")
        return real_ingest(ready)

    def maintain(sid, n, splits=True, offload=True):
        order.append("upkeep")
        return real_maintain(sid, n, splits=splits, offload=offload)

    monkeypatch.setattr(e, "_ingest_frames", ingest)
    monkeypatch.setattr(e.loop, "_maintain", maintain)

    async def go():
        e.loop.needs_maintenance.add("a")  # upkeep planned in the ingest's step
        e.submit_frames("a", frames(2, seed=7), [0.0, 1.0])
        while e.loop.has_work():
            await asyncio.sleep(0.01)

    asyncio.run(go())
    assert order[:3] == ["ingest", "call", "upkeep"], order
