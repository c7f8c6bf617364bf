"""Engine isolation on a shard (no Ray): a request the engine fails on fails alone and leaves
the shard healthy; the shard is broken only when the engine then fails a known-good probe; a
poison record in a log quarantines its stream on replay, never the shard replaying it (issue 20,
items 2 and 3)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mosaic_ray.engine.interface import InvalidInputError
from mosaic_ray.runtime.errors import EngineFailedError, RequestFailedError, StreamQuarantinedError
from mosaic_ray.runtime.durability.frame_log import FrameRecord, TextRecord
from mosaic_ray.runtime.durability.shard_log import frame_record
from tests.runtime.fake_engine import BREAK_TEXT, CRASH_TEXT
from tests.runtime.shard_fixtures import STORE, forget_store, local_shard, shared_store, stop_local

FRAME = np.full((8, 8, 3), 100, np.uint8)


@pytest.fixture
def runtime(request):
    name = f"iso-{request.node.name}"
    forget_store(name)
    yield name
    forget_store(name)


def test_a_request_the_engine_fails_on_fails_alone_and_the_shard_stays_healthy(runtime):
    async def go():
        shard = local_shard(runtime)
        try:
            await shard.open_stream("a")
            await shard.open_stream("b")
            await shard.append_frames("a", None, [FRAME], [0.0])
            with pytest.raises(RequestFailedError) as failed:
                await shard.append_text("a", CRASH_TEXT, 1.0)
            await shard.check_health()  # not broken
            await shard.open_stream("c")  # still takes new streams
            ack = await shard.append_frames("b", None, [FRAME], [0.0])
            info = await shard.stream_info("a")
            return failed.value, ack, info, list(shared_store(None, runtime).read("a"))
        finally:
            stop_local(shard)

    failed, ack, info, log = asyncio.run(go())
    assert failed.status == 500 and failed.code == "request_failed"
    assert ack["frames_added"] == 1 and info["frames"] == 1 and info["texts"] == 0
    assert not any(isinstance(r, TextRecord) for r in log)  # the failed text is not in the log


def test_the_shard_is_broken_only_when_the_engine_fails_its_probe_too(runtime):
    async def go():
        shard = local_shard(runtime)
        try:
            await shard.open_stream("a")
            with pytest.raises(EngineFailedError):
                await shard.append_text("a", BREAK_TEXT, 1.0)
            with pytest.raises(EngineFailedError, match="engine broken"):
                await shard.check_health()
        finally:
            stop_local(shard)

    asyncio.run(go())


def _poison_frames(seq: int) -> FrameRecord:
    record = frame_record(seq, [FRAME], [0.0])
    return FrameRecord(seq, record.frames, (1e300,))  # written before the bounds existed


@pytest.mark.parametrize("poison", ["out_of_bounds_frame", "text_the_engine_fails_on"])
def test_a_poison_record_quarantines_its_stream_on_replay_and_not_the_shard(runtime, poison):
    async def go():
        first = local_shard(runtime, 0)
        await first.open_stream("poisoned")
        await first.open_stream("other")
        await first.append_frames("poisoned", None, [FRAME], [0.0])
        await first.append_frames("other", None, [FRAME, FRAME], [0.0, 1.0])
        record = _poison_frames(1) if poison == "out_of_bounds_frame" else TextRecord(CRASH_TEXT, 2.0)
        shared_store(None, runtime).append("poisoned", [record])
        stop_local(first)  # killed: both streams are rebuilt on the next shard
        second = local_shard(runtime, 1)
        try:
            await second.open_stream("resident")  # a stream the rebuilding shard already held
            await second.append_frames("resident", None, [FRAME], [0.0])
            with pytest.raises(StreamQuarantinedError) as quarantined:
                await second.recover_stream("poisoned")
            await second.check_health()
            rebuilt = await second.recover_stream("other")
            resident = await second.append_frames("resident", None, [FRAME], [1.0])
            engine_streams = await second._call(second._engine.list_streams)
            return quarantined.value, rebuilt, resident, engine_streams
        finally:
            stop_local(second)

    quarantined, rebuilt, resident, engine_streams = asyncio.run(go())
    assert quarantined.status == 500 and quarantined.code == "stream_quarantined"
    assert rebuilt["frames"] == 2 and rebuilt["last_seq"] == 0
    assert resident["frames_total"] == 2
    assert engine_streams == ["other", "resident"]  # nothing of the poisoned stream is left


def test_requests_the_real_engine_fails_on_leave_its_shard_healthy(runtime):
    """The requests of issue 20 item 2, on the tiny real engine, each of which used to mark the
    shard broken: a temperature of 1e-39 is answered greedily (the sampler's floor,
    `bounds.MIN_TEMPERATURE`), a seed beyond 63 bits is refused (422) and a frame at ts=1e300 is
    refused before the engine sees it (422); the shard stays healthy and the stream answers after."""
    from mosaic_ray.runtime.actors.shard import ShardActor

    engine = {"factory": "mosaic_ray.engine.stream_engine:StreamEngine.from_spec",
              "kwargs": {"model": "tiny", "device": "cpu", "kv_pool": {"capacity_tokens": 1 << 14},
                         "cache": {"retrieval": "full", "pool": {"capacity_bytes": 16 << 20}}}}
    frame = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)

    async def go():
        shard = ShardActor.__ray_actor_class__(f"{runtime}:shard:0", engine, {"num_gpus": 0, "num_cpus": 0},
                                               {}, {"enabled": False}, runtime)
        try:
            await shard.open_stream("a")
            await shard.append_frames("a", None, [frame], [0.0])
            tiny = await shard.answer("a", {"question": "what?", "max_tokens": 2, "temperature": 1e-39})
            greedy = await shard.answer("a", {"question": "what?", "max_tokens": 2, "temperature": 0.0})
            with pytest.raises(InvalidInputError):
                await shard.answer("a", {"question": "what?", "max_tokens": 2, "temperature": 1.0, "seed": 2**70})
            with pytest.raises(InvalidInputError):
                await shard.append_frames("a", None, [frame], [1e300])
            await shard.check_health()
            answer = await shard.answer("a", {"question": "what?", "max_tokens": 2})
            ack = await shard.append_frames("a", None, [frame], [1.0])
            return tiny, greedy, answer, ack
        finally:
            stop_local(shard)

    tiny, greedy, answer, ack = asyncio.run(go())
    assert tiny["text"] == greedy["text"]
    assert answer["deltas"] >= 1 and ack["frames_total"] == 2


def test_a_rebuild_without_room_is_an_overload_not_a_quarantine(runtime):
    """A shard whose host pool cannot hold a stream's snapshot refuses its rebuild with 503
    `overloaded` (the router tries again, later or elsewhere): not 'snapshot unusable' -> a
    fallback past the compaction -> quarantined, as a full pool did before (seen on an H100 under
    reliability_load.py); nothing of the stream stays there, and a shard with room rebuilds it
    whole."""
    from mosaic_ray.engine.interface import OverloadedError
    from mosaic_ray.runtime.actors.shard import ShardActor

    def real(index: int, pool_bytes: int):
        engine = {"factory": "mosaic_ray.engine.stream_engine:StreamEngine.from_spec",
                  "kwargs": {"model": "tiny", "device": "cpu", "kv_pool": {"capacity_tokens": 1 << 14},
                             "cache": {"retrieval": "cluster", "window_tokens": 24, "sink_tokens": 4,
                                       "pool": {"capacity_bytes": pool_bytes}}}}
        return ShardActor.__ray_actor_class__(
            f"{runtime}:shard:{index}", engine, {"num_gpus": 0, "num_cpus": 0}, {},
            {"enabled": True, "store": STORE, "snapshot_every_frames": 8}, runtime)

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(12)]

    async def go():
        first = real(0, 16 << 20)
        await first.open_stream("s")
        for seq in range(12):
            await first.append_frames("s", seq, [frames[seq]], [float(seq)])
        while (await first.snapshot_stats())["taken"] < 1:
            await asyncio.sleep(0.05)
        stop_local(first)
        small = real(1, 64 << 10)
        try:
            with pytest.raises(OverloadedError) as refused:
                await small.recover_stream("s")
            await small.check_health()
            left = await small._call(small._engine.list_streams)
        finally:
            stop_local(small)
        roomy = real(2, 16 << 20)
        try:
            rebuilt = await roomy.recover_stream("s")
            info = await roomy.stream_info("s")
        finally:
            stop_local(roomy)
        return refused.value, left, rebuilt, info

    refused, left, rebuilt, info = asyncio.run(go())
    assert refused.status == 503 and "no room" in str(refused)
    assert left == []
    assert rebuilt["snapshot_mark"] is not None and info["frames"] == 12 and info["last_seq"] == 11
