"""Graceful stop and restart of a whole runtime: drained (new requests 503, logs fsynced), every
actor killed and the stream map lost (as with a new Ray cluster), then started again with the same
log root: every stream comes back with all its frames, text and last_seq, and takes new frames."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.bootstrap import connect_runtime, drain_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import QuotaExceededError, ShuttingDownError
from mosaic_ray.runtime.placement.stream_map import open_store
from mosaic_ray.serve.directory import StreamDirectory
from tests.runtime.fake_engine import FACTORY

pytestmark = pytest.mark.ray

STREAMS = ["r-0", "r-1", "r-2"]
BATCHES = 5
PER_BATCH = 3
COME_BACK_S = 30.0


def _frames(seq: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), (seq * PER_BATCH + i) * 11 % 256, np.uint8) for i in range(PER_BATCH)]


async def _until_served(d: StreamDirectory, sid: str) -> dict:
    deadline = time.monotonic() + COME_BACK_S
    while True:
        try:
            return await d.call(sid, "stream_info")
        except EngineError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _wait_gone(cfg: RuntimeConfig) -> None:
    """ray.kill returns before the actors are gone; a new runtime must not find the old ones."""
    deadline = time.monotonic() + 30
    for name in [cfg.router_name, *cfg.shard_names]:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=cfg.namespace)
            except ValueError:
                break
            time.sleep(0.1)


def test_a_restarted_runtime_rebuilds_its_streams_from_the_logs(ray_cluster, tmp_path):
    cfg = RuntimeConfig(
        name="restart", num_shards=2,
        engine={"factory": FACTORY},
        shard={"num_gpus": 1, "num_cpus": 0},
        router={"health_interval_s": 0, "load_cache_s": 0},
        durability={"root": str(tmp_path / "log"), "fsync": "never"},  # the drain fsyncs
    )
    shutdown_runtime(cfg, forget_streams=True)

    async def before():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        for sid in STREAMS:
            await d.ask_router("create_stream", sid)
            for seq in range(BATCHES):
                await d.call(sid, "append_frames", seq, _frames(seq), [float(seq * PER_BATCH + i) for i in range(PER_BATCH)])
            await d.call(sid, "append_text", f"note on {sid}", 100.0)
        infos = {sid: await d.call(sid, "stream_info") for sid in STREAMS}
        drained = await drain_runtime(cfg, timeout_s=5)
        with pytest.raises(ShuttingDownError):
            await d.call(STREAMS[0], "append_frames", BATCHES, _frames(BATCHES), [99.0] * PER_BATCH)
        return infos, drained

    infos, drained = asyncio.run(before())
    assert all(v["unfinished"] == 0 for v in drained.values()) and len(drained) == 2

    shutdown_runtime(cfg)  # actors gone, logs kept
    store = open_store(cfg.router.state_store, cfg.name, cfg.namespace)
    for sid in store.load():  # a new Ray cluster has no map either
        store.delete(sid)
    _wait_gone(cfg)

    async def after():
        start = time.monotonic()
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        back = {sid: await _until_served(d, sid) for sid in STREAMS}
        elapsed = time.monotonic() - start
        dup = await d.call(STREAMS[0], "append_frames", BATCHES - 1, _frames(BATCHES - 1), [0.0] * PER_BATCH)
        new = await d.call(STREAMS[0], "append_frames", BATCHES, _frames(BATCHES),
                           [float(BATCHES * PER_BATCH + i) for i in range(PER_BATCH)])
        answer = await d.call(STREAMS[1], "answer", {"question": "still there?"})
        listed = sorted(await d.ask_router("list_streams"))
        await d.ask_router("delete_stream", STREAMS[2])
        return back, elapsed, dup, new, answer, listed

    try:
        back, elapsed, dup, new, answer, listed = asyncio.run(after())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    print(f"\nRESTART rebuilt {len(STREAMS)} streams in {elapsed:.2f} s (start included)")
    assert listed == STREAMS
    assert not (tmp_path / "log" / cfg.name / f"{STREAMS[2]}.log").exists()  # deleted with its stream
    assert (tmp_path / "log" / cfg.name / f"{STREAMS[1]}.log").exists() is False  # forget_streams
    for sid in STREAMS:
        for key in ("frames", "texts", "last_seq", "duration_s"):
            assert back[sid][key] == infos[sid][key], (sid, key)
    assert dup["duplicate"] and new["frames_total"] == (BATCHES + 1) * PER_BATCH
    assert answer["text"].startswith(f"I saw {BATCHES * PER_BATCH} frames")


def test_drain_lets_an_admitted_answer_finish_and_refuses_new_work(ray_cluster, tmp_path):
    cfg = RuntimeConfig(
        name="drain", num_shards=1,
        engine={"factory": FACTORY, "kwargs": {"token_delay_s": 0.05}},  # an answer takes ~1 s
        shard={"num_gpus": 1, "num_cpus": 0},
        router={"health_interval_s": 0},
        durability={"root": str(tmp_path / "log")},
    )
    shutdown_runtime(cfg, forget_streams=True)

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        await d.ask_router("create_stream", "busy")
        await d.call("busy", "append_frames", 0, _frames(0), [0.0, 1.0, 2.0])
        answering = asyncio.create_task(d.call("busy", "answer", {"question": "what?", "max_tokens": 20}))
        await asyncio.sleep(0.3)  # admitted, answering
        drained = await drain_runtime(cfg, timeout_s=10)
        answer = await answering
        with pytest.raises(ShuttingDownError):
            await d.call("busy", "stream_info")
        with pytest.raises(ShuttingDownError):
            await d.ask_router("create_stream", "late")
        return drained, answer

    try:
        drained, answer = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert [v["unfinished"] for v in drained.values()] == [0]
    assert answer["text"].startswith("I saw 3 frames")


QUOTA_PREFIX = "ten:"
QUOTA = 3
SLOW_FRAME_S = 0.1  # the fake engine's time per frame: the restarted runtime's replays take seconds


def test_after_a_restart_the_quota_counts_the_streams_still_being_rebuilt(ray_cluster, tmp_path):
    """Issue 20, item 8: a tenant at its quota before a restart is still at it while its streams
    are rebuilt from their logs: a create is refused (429), none overshoots."""
    cfg = RuntimeConfig(
        name="restartquota", num_shards=1,
        engine={"factory": FACTORY, "kwargs": {"frame_delay_s": SLOW_FRAME_S}},
        shard={"num_gpus": 1, "num_cpus": 0},
        router={"health_interval_s": 0, "load_cache_s": 0},
        durability={"root": str(tmp_path / "log"), "fsync": "never"},
    )
    quota = (QUOTA_PREFIX, QUOTA, 1.0)
    held = [f"{QUOTA_PREFIX}{i}" for i in range(QUOTA)]
    shutdown_runtime(cfg, forget_streams=True)

    async def before():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        for sid in held:
            await d.ask_router("create_stream", sid, None, quota)
            await d.call(sid, "append_frames", 0, _frames(0) * 3, [float(i) for i in range(3 * PER_BATCH)])
        await drain_runtime(cfg, timeout_s=5)

    asyncio.run(before())
    shutdown_runtime(cfg)
    store = open_store(cfg.router.state_store, cfg.name, cfg.namespace)
    for sid in store.load():
        store.delete(sid)
    _wait_gone(cfg)

    async def after():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        status = await d.ask_router("recovery_status")
        with pytest.raises(QuotaExceededError):
            await d.ask_router("create_stream", f"{QUOTA_PREFIX}new", None, quota)
        back = [await _until_served(d, sid) for sid in held]
        with pytest.raises(QuotaExceededError):
            await d.ask_router("create_stream", f"{QUOTA_PREFIX}new", None, quota)
        return status, back, sorted(await d.ask_router("list_streams"))

    try:
        status, back, listed = asyncio.run(after())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert status["recovering"], "the streams were rebuilt before the create: the test did not race"
    assert listed == held and all(b["frames"] == 3 * PER_BATCH for b in back)
