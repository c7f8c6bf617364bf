"""IngestQueue on a real EngineRunner and the fake engine, without Ray: order, coalescing, seq
deduplication, failure isolation and backpressure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import SeqConflictError, ShardBusyError
from mosaic_ray.runtime.frame_batcher import FrameBatcher
from mosaic_ray.runtime.ingest import IngestQueue
from mosaic_ray.runtime.shard_metrics import ShardMeter
from mosaic_ray.runtime.stream_slot import StreamSlot
from tests.runtime.fake_engine import FakeEngine, frame_feature

FRAME_DELAY_S = 0.02  # keeps the engine busy so that later batches queue up behind the first


class Harness:
    def __init__(self, max_pending: int = 1000, delay: float = FRAME_DELAY_S) -> None:
        self.engine = FakeEngine(frame_delay_s=delay)
        self.engine.open_stream("s")
        self.calls: list[int] = []
        original = self.engine.append_frames

        def spy(sid, frames, ts):
            self.calls.append(len(frames))
            return original(sid, frames, ts)

        self.engine.append_frames = spy
        self.runner = EngineRunner("test")
        self.meter = ShardMeter(10.0, (0.1,))
        self.batcher = FrameBatcher(self.engine, self.runner.call, 64)
        self.queue = IngestQueue(self.batcher.append, self.meter, max_pending, 64)
        self.slot = StreamSlot("s", 10.0)

    def submit(self, seq, values, stamps):
        frames = [np.full((8, 8, 3), v, np.uint8) for v in values]
        return self.queue.submit(self.slot, seq, frames, stamps)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_batches_are_coalesced_and_kept_in_order():
    async def go():
        h = Harness()
        acks = await asyncio.gather(*(h.submit(i, [i], [float(i)]) for i in range(6)))
        return h, acks

    h, acks = run(go())
    assert [a["seq"] for a in acks] == list(range(6)) and not any(a["duplicate"] for a in acks)
    assert sum(h.calls) == 6 and len(h.calls) < 6  # fewer engine calls than requests
    feats = h.engine.export_stream("s")["tensors"]["features"].numpy()
    expected = [frame_feature(np.full((8, 8, 3), i, np.uint8)) for i in range(6)]
    assert np.array_equal(feats, np.stack(expected))
    assert h.slot.last_seq == 5 and h.queue.pending_frames == 0


def test_a_repeated_seq_is_acknowledged_once_and_never_appended_twice():
    async def go():
        h = Harness()
        first, replay = await asyncio.gather(h.submit(7, [1, 2], [0.0, 1.0]), h.submit(7, [1, 2], [0.0, 1.0]))
        with pytest.raises(SeqConflictError):
            await h.submit(3, [9], [5.0])
        auto = await h.submit(None, [3], [2.0])
        return h, first, replay, auto

    h, first, replay, auto = run(go())
    assert first["frames_added"] == 2 and not first["duplicate"]
    assert replay["duplicate"] and replay["frames_added"] == 0
    assert auto["seq"] == 8
    assert h.engine.stream_info("s")["frames"] == 3


def test_a_bad_batch_fails_alone_inside_a_coalesced_group():
    async def go():
        h = Harness()
        blocker = h.submit(0, [0], [0.0])
        results = await asyncio.gather(
            blocker,
            h.submit(1, [1], [1.0]),
            h.submit(2, [2], [0.5]),  # goes back in time: the engine refuses it
            h.submit(3, [3], [3.0]),
            return_exceptions=True,
        )
        return h, results

    h, results = run(go())
    assert isinstance(results[2], InvalidInputError)
    assert [r["seq"] for i, r in enumerate(results) if i != 2] == [0, 1, 3]
    assert h.engine.stream_info("s")["frames"] == 3 and h.slot.last_seq == 3


def test_a_full_queue_answers_busy_with_a_retry_hint():
    async def go():
        h = Harness(max_pending=4, delay=0.05)
        first = asyncio.ensure_future(h.submit(0, [0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0]))
        await asyncio.sleep(0)
        with pytest.raises(ShardBusyError) as busy:
            await h.submit(1, [4], [4.0])
        await first
        return busy.value

    busy = run(go())
    assert busy.status == 503 and busy.retry_after_s >= 1.0


def test_appends_of_different_streams_share_one_engine_call_and_fail_alone():
    async def go():
        h = Harness()
        for sid in ("t", "u"):
            h.engine.open_stream(sid)
        slots = {sid: StreamSlot(sid, 10.0) for sid in ("s", "t", "u")}
        frames = [np.zeros((8, 8, 3), np.uint8)]

        async def round_(seq: int, u_ts: float):
            # Three streams append in the same instant: one engine call takes all three.
            return await asyncio.gather(
                h.queue.submit(slots["s"], seq, frames, [float(seq)]),
                h.queue.submit(slots["t"], seq, frames, [float(seq)]),
                h.queue.submit(slots["u"], seq, frames, [u_ts]),
                return_exceptions=True,
            )

        ok = await round_(0, 0.0)
        calls_ok = h.batcher.calls
        bad = await round_(1, float("nan"))  # u's frame is refused by the engine
        return h, ok, calls_ok, bad

    h, ok, calls_ok, bad = run(go())
    assert [r["frames_added"] for r in ok] == [1, 1, 1] and calls_ok == 1
    assert bad[0]["frames_added"] == 1 and bad[1]["frames_added"] == 1
    assert isinstance(bad[2], InvalidInputError)
    assert [h.engine.stream_info(s)["frames"] for s in ("s", "t", "u")] == [2, 2, 1]


def test_streams_a_failed_batch_already_applied_are_acknowledged_not_appended_twice():
    from mosaic_ray.engine.interface import BatchPartlyAppliedError

    engine = FakeEngine(frame_delay_s=FRAME_DELAY_S)
    for sid in "abc":
        engine.open_stream(sid)
    real_batch, calls = engine.append_frames_batch, []

    def batch(items):  # the first batch: "a" commits, then the pool is "full"
        calls.append([sid for sid, _, _ in items])
        if len(items) == 1 or calls.count(["a", "b"]) > 1:
            return real_batch(items)
        n = real_batch(items[:1])
        raise BatchPartlyAppliedError({items[0][0]: n[0]}, MemoryError("pool full"))

    engine.append_frames_batch = batch
    batcher = FrameBatcher(engine, EngineRunner("test").call, 64)

    async def go():
        blocker = asyncio.create_task(batcher.append("c", [np.zeros((8, 8, 3), np.uint8)], [0.0]))
        await asyncio.sleep(0.005)  # "c" occupies the engine; "a" and "b" queue into one batch
        both = await asyncio.gather(*(batcher.append(s, [np.full((8, 8, 3), 7, np.uint8)], [1.0]) for s in "ab"))
        return await blocker, both

    held_c, (held_a, held_b) = run(go())
    assert held_c == 1 and held_a == 1 and held_b == 1
    assert [engine.stream_info(s)["frames"] for s in "ab"] == [1, 1]
    assert ["a", "b"] in calls  # the batch that partly failed; "b" was then retried alone
