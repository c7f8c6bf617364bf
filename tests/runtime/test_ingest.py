"""IngestQueue on a real EngineRunner and the fake engine, without Ray: order, coalescing, seq
deduplication, failure isolation and backpressure."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.actors.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import SeqConflictError, ShardBusyError
from mosaic_ray.runtime.actors.ingest import IngestQueue
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import StreamSlot
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
        self.queue = IngestQueue(self.append, self.meter, max_pending, 64)
        self.slot = StreamSlot("s", 10.0)

    async def append(self, sid, frames, stamps):
        return await self.runner.call(self.engine.append_frames, sid, frames, stamps)

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


def test_appends_of_different_streams_share_one_step_of_the_engine_loop_and_fail_alone():
    """The shard's path into a real engine: IngestQueue -> `StreamEngine.ingest_frames` on the
    engine thread. Appends of streams that meet are ingested by one step (one forward), and a
    refused batch fails alone."""
    from mosaic_ray.config import CacheConfig, EngineConfig
    from mosaic_ray.engine.stream_engine import StreamEngine
    from mosaic_ray.model.registry import load_model

    cfg = EngineConfig(model="tiny", device="cpu", kv_pool={"capacity_tokens": 1 << 14},
                       cache=CacheConfig(retrieval="full", pool={"capacity_bytes": 16 << 20}))
    engine = StreamEngine(cfg, adapter=load_model("tiny", "cpu"))
    runner = EngineRunner("test")
    ids = ("s", "t", "u")
    for sid in ids:
        engine.open_stream(sid)

    async def append(sid, frames, ts):
        return await runner.await_(lambda: engine.ingest_frames(sid, frames, ts))

    forwards, real_ingest = [], engine._ingest_frames

    def spy(ready):  # the streams of each ingest forward
        forwards.append([state.stream_id for state, _, _ in ready])
        return real_ingest(ready)

    engine._ingest_frames = spy
    queue = IngestQueue(append, ShardMeter(10.0, (0.1,)), 1000, 64)
    slots = {sid: StreamSlot(sid, 10.0) for sid in ids}
    rng = np.random.default_rng(0)

    async def round_(seq: int, u_ts: float):
        return await asyncio.gather(
            *(queue.submit(slots[sid], seq, [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)],
                           [u_ts if sid == "u" else float(seq)]) for sid in ids),
            return_exceptions=True,
        )

    async def go():
        busy = asyncio.ensure_future(runner.call(time.sleep, 0.3))  # the three appends queue behind it
        await asyncio.sleep(0.05)
        ok = await round_(0, 0.0)
        await busy
        bad = await round_(1, float("nan"))  # u's frame is refused by the engine
        return ok, bad

    try:
        ok, bad = run(go())
    finally:
        runner.close()
    assert [r["frames_added"] for r in ok] == [1, 1, 1] and [r["frames_total"] for r in ok] == [1, 1, 1]
    assert forwards[0] == ["s", "t", "u"]  # round 0: one forward for the three streams
    assert bad[0]["frames_added"] == 1 and bad[1]["frames_added"] == 1
    assert isinstance(bad[2], InvalidInputError)
    assert [engine.stream_info(s)["frames"] for s in ids] == [2, 2, 1]
    assert [slots[s].last_seq for s in ids] == [1, 1, 0]


def test_queued_frames_free_the_stream_lock_until_they_are_in():
    """With an engine that queues frames (`queued=True`), the stream's lock covers the hand-over
    only: a question can take it while the step loop has the frames, and the batch is
    acknowledged once they are in, not before."""
    from mosaic_ray.runtime.actors.shard_metrics import ShardMeter

    async def go():
        handed, release = [], asyncio.Event()

        async def append(sid, frames, stamps):  # queued now; in once `release` is set
            handed.append(len(frames))

            async def ingested():
                await release.wait()
                return len(frames)

            return ingested()

        queue = IngestQueue(append, ShardMeter(10.0, (0.1,)), 1000, 64, queued=True)
        slot = StreamSlot("s", 10.0)
        ack = asyncio.ensure_future(queue.submit(slot, 0, [np.zeros((8, 8, 3), np.uint8)], [0.0]))
        while not handed:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(slot.lock.acquire(), 1.0)  # a question of the stream gets in now
        slot.lock.release()
        assert not ack.done() and slot.last_seq == -1  # not acknowledged before the frames are in
        release.set()
        return await ack, slot.last_seq

    got, last = asyncio.run(go())
    assert got["seq"] == 0 and got["frames_added"] == 1 and last == 0
