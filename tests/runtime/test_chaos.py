"""Chaos: a shard actor killed with `ray.kill` while several streams ingest into it.

Every acknowledged frame must be there after recovery (the stream's frames and last_seq equal
what was acknowledged), questions must be answered again, and within RECOVERY_LIMIT_S of the kill.
Clients behave as `mosaic_ray.client` does: a 503 is retried with the same seq after a pause.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time

import numpy as np
import pytest
import ray
from PIL import Image

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.durability.frame_codec import inspect
from mosaic_ray.runtime.durability.frame_log import TextRecord
from mosaic_ray.runtime.durability.frame_log_stores import open_frame_log
from mosaic_ray.serve.directory import StreamDirectory
from tests.runtime.fake_engine import BREAK_TEXT, CRASH_TEXT, FACTORY

pytestmark = pytest.mark.ray

NUM_STREAMS = 6
FRAMES_PER_BATCH = 4
INGEST_BEFORE_KILL_S = 1.5
INGEST_AFTER_KILL_S = 3.0
RECOVERY_LIMIT_S = 30.0
RETRY_PAUSE_S = 0.2


def _jpeg(value: int, size: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(out, format="JPEG")
    return out.getvalue()


FRAMES = [inspect("jpeg", _jpeg(v * 37), 1 << 20) for v in range(8)]


def _config(name: str, root: str, num_shards: int) -> RuntimeConfig:
    return RuntimeConfig(
        name=name,
        num_shards=num_shards,
        engine={"factory": FACTORY, "kwargs": {"frame_delay_s": 0.001}},
        shard={"num_gpus": 1, "num_cpus": 0, "start_timeout_s": 60},
        router={"health_interval_s": 1.0, "load_cache_s": 0},
        durability={"root": root, "fsync": "interval", "fsync_interval_ms": 50},
    )


async def _call(d: StreamDirectory, sid: str, method: str, *args, deadline: float):
    """One call, retried on 503 (recovering, shard gone, busy) like the client does."""
    while True:
        try:
            return await d.call(sid, method, *args)
        except EngineError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_PAUSE_S)


async def _kill_shard0_until_quarantined(d: StreamDirectory, cfg: RuntimeConfig, sid: str) -> EngineError:
    """Kill shard 0 for good, then poll `sid` until it answers 500 (its rebuild failed and it is
    quarantined) or RECOVERY_LIMIT_S pass; returns the last error it answered."""
    ray.kill(ray.get_actor(cfg.shard_name(0), namespace=cfg.namespace), no_restart=True)
    deadline = time.monotonic() + RECOVERY_LIMIT_S
    while True:
        try:
            await d.call(sid, "stream_info")
        except EngineError as exc:
            if exc.status == 500 or time.monotonic() > deadline:
                return exc
        await asyncio.sleep(0.1)


async def _ingest(d: StreamDirectory, sid: str, stop: asyncio.Event, acked: dict) -> None:
    seq = 0
    while not stop.is_set():
        stamps = [float(seq * FRAMES_PER_BATCH + i) for i in range(FRAMES_PER_BATCH)]
        frames = [FRAMES[(seq + i) % len(FRAMES)] for i in range(FRAMES_PER_BATCH)]
        ack = await _call(d, sid, "append_frames", seq, frames, stamps, deadline=time.monotonic() + 60)
        assert ack["seq"] == seq
        acked[sid] = (seq, (seq + 1) * FRAMES_PER_BATCH)  # (last seq acked, frames acked)
        seq += 1


# 3 shards: the dead shard's streams go to the two live ones at once. 1 shard: they wait for
# the replacement actor to start (the whole runtime was that shard).
@pytest.fixture(params=[3, 1], ids=["3-shards", "1-shard"])
def runtime(ray_cluster, tmp_path, request):
    cfg = _config(f"chaos{request.param}", str(tmp_path / "log"), request.param)
    shutdown_runtime(cfg, forget_streams=True)
    asyncio.run(connect_runtime(cfg))
    yield cfg
    shutdown_runtime(cfg, forget_streams=True)


def test_killed_shard_loses_no_acknowledged_frame(runtime):
    async def go():
        d = await StreamDirectory.connect(runtime)
        sids = [f"chaos-{i}" for i in range(NUM_STREAMS)]
        for sid in sids:
            await d.ask_router("create_stream", sid)
        await _call(d, sids[0], "append_text", "a note before the crash", 0.0, deadline=time.monotonic() + 10)
        placement = await d.ask_router("list_streams")
        victim = max(runtime.shard_names, key=lambda n: sum(s == n for s in placement.values()))
        on_victim = [s for s, n in placement.items() if n == victim]

        acked: dict[str, tuple[int, int]] = {}
        stop = asyncio.Event()
        feeders = [asyncio.create_task(_ingest(d, sid, stop, acked)) for sid in sids]
        await asyncio.sleep(INGEST_BEFORE_KILL_S)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace=runtime.namespace), no_restart=True)

        # Recovery time: from the kill until every stream of the dead shard answers a question.
        answered = {}
        for sid in on_victim:
            out = await _call(d, sid, "answer", {"question": "how many frames?"},
                              deadline=killed_at + RECOVERY_LIMIT_S)
            answered[sid] = out["text"]
        recovery_s = time.monotonic() - killed_at
        await asyncio.sleep(max(0.0, INGEST_AFTER_KILL_S - recovery_s))
        stop.set()
        await asyncio.gather(*feeders)

        infos = {sid: await _call(d, sid, "stream_info", deadline=time.monotonic() + 30) for sid in sids}
        status = await d.ask_router("recovery_status")
        return victim, on_victim, acked, infos, answered, recovery_s, status

    victim, on_victim, acked, infos, answered, recovery_s, status = asyncio.run(go())
    figures = {
        "shards": runtime.num_shards,
        "recovery_s": round(recovery_s, 2),
        "streams_on_killed_shard": len(on_victim),
        "frames_acked": sum(a[1] for a in acked.values()),
        "frames_stored": sum(i["frames"] for i in infos.values()),
        "replayed_frames": sum(e["frames"] for e in status["episodes"]),
        "rebuild_s": [round(e["seconds"] or -1, 2) for e in status["episodes"]],
    }
    print("\nCHAOS", json.dumps(figures))
    if os.environ.get("MOSAIC_RELIABILITY_OUT"):
        with open(os.environ["MOSAIC_RELIABILITY_OUT"], "a") as f:
            f.write(json.dumps({"test": "chaos", **figures}) + "\n")
    assert on_victim, "the killed shard held no stream"
    for sid, (last_seq, frames) in acked.items():
        assert infos[sid]["frames"] == frames, sid
        assert infos[sid]["last_seq"] == last_seq, sid
    assert infos["chaos-0"]["texts"] >= 1  # the note survived (questions add Q/A turns after it)
    assert all(text.startswith("I saw") for text in answered.values())
    assert not status["recovering"] and status["episodes"][0]["streams"] == len(on_victim)
    assert recovery_s < RECOVERY_LIMIT_S


def test_a_refused_batch_costs_no_acknowledged_frame_when_the_shard_is_killed(ray_cluster, tmp_path):
    """Issue 20, item 1, as reported: JPEG frames without seq at ts 5, 1, 6 (200, 422, 200), then
    the shard is killed: the rebuilt stream holds both acknowledged frames and last_seq 1."""
    cfg = _config("chaosrefused", str(tmp_path / "log"), 2)
    shutdown_runtime(cfg, forget_streams=True)

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        await d.ask_router("create_stream", "cam", cfg.shard_name(0))
        first = await d.call("cam", "append_frames", None, FRAMES[:1], [5.0])
        with pytest.raises(EngineError) as refused:
            await d.call("cam", "append_frames", None, FRAMES[1:2], [1.0])
        third = await d.call("cam", "append_frames", None, FRAMES[2:3], [6.0])
        before = await d.call("cam", "stream_info")
        ray.kill(ray.get_actor(cfg.shard_name(0), namespace=cfg.namespace), no_restart=True)
        after = await _call(d, "cam", "stream_info", deadline=time.monotonic() + RECOVERY_LIMIT_S)
        return first, refused.value, third, before, after

    try:
        first, refused, third, before, after = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert (first["seq"], refused.status, third["seq"]) == (0, 422, 1)
    assert (before["frames"], before["last_seq"]) == (2, 1)
    assert (after["frames"], after["last_seq"], after["duration_s"]) == (2, 1, 1.0)


def test_a_migrated_stream_is_rebuilt_with_the_frames_of_both_shards(ray_cluster, tmp_path):
    """A stream's log follows it: frames taken before a move (on the source) and after it (on the
    target) are all replayed when the target dies."""
    cfg = _config("chaosmove", str(tmp_path / "log"), 2)
    shutdown_runtime(cfg, forget_streams=True)

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        first = (await d.ask_router("create_stream", "moved", cfg.shard_name(0)))["shard"]
        deadline = time.monotonic() + 60
        for seq in range(3):
            await _call(d, "moved", "append_frames", seq, FRAMES[:2], [2.0 * seq, 2.0 * seq + 1], deadline=deadline)
        await d.ask_router("migrate", "moved", cfg.shard_name(1), "object_store")
        await _call(d, "moved", "append_text", "after the move", 6.0, deadline=deadline)
        for seq in range(3, 5):
            await _call(d, "moved", "append_frames", seq, FRAMES[:2], [2.0 * seq, 2.0 * seq + 1], deadline=deadline)
        before = await d.call("moved", "stream_info")
        ray.kill(ray.get_actor(cfg.shard_name(1), namespace=cfg.namespace), no_restart=True)
        after = await _call(d, "moved", "stream_info", deadline=time.monotonic() + RECOVERY_LIMIT_S)
        return first, before, after

    try:
        first, before, after = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert first == cfg.shard_name(0) and before["shard"] == cfg.shard_name(1)
    assert (after["frames"], after["last_seq"], after["texts"]) == (10, 4, 1)
    assert after["duration_s"] == before["duration_s"]


def _inject(cfg: RuntimeConfig, sid: str, record) -> None:
    """Append `record` to `sid`'s log as a second writer would (the shard's handle is O_APPEND):
    a record the service no longer takes, left by an older version."""
    store = open_frame_log(cfg.durability, cfg.name)
    try:
        store.append(sid, [record])
    finally:
        store.close()


def test_a_stream_whose_log_holds_a_poison_record_is_quarantined_and_no_shard_breaks(ray_cluster, tmp_path):
    """A poison record (one the fake engine crashes on, in the log from before records were logged
    only once accepted) quarantines its stream on replay (500 `stream_quarantined`, never retried);
    the shard that replayed it stays healthy and keeps serving its other streams."""
    cfg = _config("chaospoison", str(tmp_path / "log"), 2)
    shutdown_runtime(cfg, forget_streams=True)

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        await d.ask_router("create_stream", "poison", cfg.shard_name(0))
        await d.ask_router("create_stream", "resident", cfg.shard_name(1))
        await d.call("poison", "append_frames", 0, FRAMES[:2], [0.0, 1.0])
        await d.call("resident", "append_frames", 0, FRAMES[:2], [0.0, 1.0])
        _inject(cfg, "poison", TextRecord(CRASH_TEXT, 2.0))
        final = await _kill_shard0_until_quarantined(d, cfg, "poison")
        first = await d.ask_router("recovery_status")
        await d.ask_router("health")  # a health round retries failed rebuilds, not quarantined ones
        await asyncio.sleep(0.5)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        resident = await _call(d, "resident", "append_frames", 1, FRAMES[:1], [2.0], deadline=deadline)
        while "dead" in str(health := await d.ask_router("health")):  # shard 0's replacement starts
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.2)
        return final, first, await d.ask_router("recovery_status"), resident, health

    try:
        final, first, later, resident, health = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert final.status == 500 and final.code == "stream_quarantined" and "could not be rebuilt" in str(final)
    assert first["quarantined"] == ["poison"] and later["quarantined"] == ["poison"]
    assert later["errors"] == first["errors"]
    assert resident["frames_total"] == 3
    assert set(health.values()) == {"ok"}  # the shard that replayed the poison is not broken


def test_broken_engines_are_replaced_when_asked(ray_cluster, tmp_path):
    """`replace_broken_shards`: a shard whose engine broke (a lost GPU, here the fake engine's break
    text: its probe fails) is killed and its streams rebuilt, the one whose request broke it too
    (the request was refused, so its log holds only what was accepted). Every stream keeps all
    its frames."""
    cfg = _config("chaosbroken", str(tmp_path / "log"), 2)
    cfg = cfg.model_copy(update={"durability": cfg.durability.model_copy(update={"replace_broken_shards": True})})
    shutdown_runtime(cfg, forget_streams=True)
    streams = {"a": cfg.shard_name(0), "b": cfg.shard_name(1), "breaker": cfg.shard_name(0)}

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        for sid, shard in streams.items():
            await d.ask_router("create_stream", sid, shard)
            await d.call(sid, "append_frames", 0, FRAMES[:3], [0.0, 1.0, 2.0])
        with pytest.raises(EngineError) as broke:
            await d.call("breaker", "append_text", BREAK_TEXT, 3.0)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while True:  # the health loop kills shard 0; its streams are rebuilt
            status = await d.ask_router("recovery_status")
            if status["episodes"] and not status["recovering"] and not status["dead"]:
                break
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.2)
        infos = {sid: await _call(d, sid, "stream_info", deadline=deadline) for sid in streams}
        answers = [await _call(d, sid, "answer", {"question": "?"}, deadline=deadline) for sid in streams]
        return broke.value, infos, status, answers, await d.ask_router("health")

    try:
        broke, infos, status, answers, health = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    assert broke.code == "engine_failure"
    assert all(i["frames"] == 3 and i["texts"] == 0 for i in infos.values())
    assert status["quarantined"] == [] and len(status["episodes"]) >= 1
    assert all(a["text"].startswith("I saw 3 frames") for a in answers)
    assert set(health.values()) == {"ok"}


def test_a_shard_killed_while_it_rebuilds_another_shards_streams(ray_cluster, tmp_path):
    """The shard replaying a dead shard's stream dies too, mid-replay: the stream is rebuilt again,
    on a replacement, with every acknowledged frame."""
    cfg = _config("chaostwice", str(tmp_path / "log"), 2)
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"kwargs": {"frame_delay_s": 0.01}})})
    shutdown_runtime(cfg, forget_streams=True)

    async def go():
        await connect_runtime(cfg)
        d = await StreamDirectory.connect(cfg)
        await d.ask_router("create_stream", "twice", cfg.shard_name(0))
        for seq in range(50):  # 200 frames: a replay of ~2 s at 10 ms a frame
            await d.call("twice", "append_frames", seq, FRAMES[:4], [4.0 * seq + i for i in range(4)])
        for i in (0, 1):  # shard 0 dies; shard 1, the only live one, starts replaying; it dies too
            ray.kill(ray.get_actor(cfg.shard_name(i), namespace=cfg.namespace), no_restart=True)
            await d.ask_router("shard_failed", cfg.shard_name(i))
            await asyncio.sleep(0.5)
        killed_at = time.monotonic()
        info = await _call(d, "twice", "stream_info", deadline=killed_at + RECOVERY_LIMIT_S)
        return info, time.monotonic() - killed_at, await d.ask_router("recovery_status")

    try:
        info, seconds, status = asyncio.run(go())
    finally:
        shutdown_runtime(cfg, forget_streams=True)
    print(f"\nCHAOS twice: back {seconds:.2f} s after the second kill, {status['failed_attempts']} failed rebuild(s)")
    assert (info["frames"], info["last_seq"]) == (200, 49)
    assert not status["recovering"]  # whether shard 1 died mid-replay or before it is timing, not a promise
