"""The runtime on a local Ray cluster: shard actors on logical GPUs, the fake engine.

Placement, migration (both transports; answers identical; requests held during a move are served,
none lost), rebalancing, a router restart, and a broken engine failing its health check.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray

from mosaic_ray.runtime.bootstrap import connect_runtime, shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.directory import StreamDirectory
from tests.runtime.fake_engine import BREAK_TEXT, FACTORY

pytestmark = pytest.mark.ray

NUM_SHARDS = 2
QUESTION = "what changed?"


@pytest.fixture(scope="module")
def runtime(ray_cluster):
    cfg = RuntimeConfig(
        name="rt-test",
        num_shards=NUM_SHARDS,
        engine={"factory": FACTORY, "kwargs": {"frame_delay_s": 0.002}},
        shard={"num_gpus": 1, "num_cpus": 0, "health_timeout_s": 5},
        router={"health_interval_s": 0, "load_cache_s": 0},
        migration={"timeout_s": 20},
    )
    shutdown_runtime(cfg, forget_streams=True)
    asyncio.run(connect_runtime(cfg))
    yield cfg
    shutdown_runtime(cfg, forget_streams=True)


def run(coro):
    return asyncio.run(coro)


async def _dir(cfg) -> StreamDirectory:
    return await StreamDirectory.connect(cfg)


def _frames(n: int, start: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), (start + i) % 256, np.uint8) for i in range(n)]


async def _feed(d: StreamDirectory, sid: str, seq0: int, batches: int, per: int = 2) -> list[dict]:
    acks = []
    for b in range(batches):
        seq = seq0 + b
        stamps = [float(seq * per + i) for i in range(per)]
        acks.append(await d.call(sid, "append_frames", seq, _frames(per, seq * per), stamps))
    return acks


async def _ask(d: StreamDirectory, sid: str, q: str = QUESTION) -> str:
    return "".join([x async for x in d.stream(sid, "ask", {"question": q})])


def _cleanup(cfg, *sids):
    async def go():
        d = await _dir(cfg)
        for sid in sids:
            try:
                await d.ask_router("delete_stream", sid)
            except Exception:
                pass

    run(go())


def test_new_streams_go_to_the_least_loaded_shard(runtime):
    async def go():
        d = await _dir(runtime)
        placed = [await d.ask_router("create_stream", f"p{i}") for i in range(4)]
        return [p["shard"] for p in placed]

    shards = run(go())
    assert sorted(shards) == sorted(runtime.shard_names * 2)
    _cleanup(runtime, *[f"p{i}" for i in range(4)])


@pytest.mark.parametrize("transport", ["distributed", "object_store"])
def test_migration_keeps_answers_identical(runtime, transport):
    a, b = runtime.shard_names
    sid, ref = f"m-{transport}", f"ref-{transport}"

    async def go():
        d = await _dir(runtime)
        for s in (sid, ref):
            await d.ask_router("create_stream", s, a)
            await _feed(d, s, 0, 3)
            await d.call(s, "append_text", "a caption", 6.0)
            await _ask(d, s, "first question")  # history must move too
        before = await d.call(sid, "stream_info")
        moved = await d.ask_router("migrate", sid, b, transport)
        after = await d.call(sid, "stream_info")
        return moved, before, after, await _ask(d, sid), await _ask(d, ref)

    moved, before, after, ans_moved, ans_ref = run(go())
    assert moved["transport"] == transport and after["shard"] == b
    kept = ("frames", "texts", "last_seq")
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert ans_moved == ans_ref
    _cleanup(runtime, sid, ref)


def test_requests_during_a_migration_are_held_then_served(runtime):
    a, b = runtime.shard_names

    async def go():
        d = await _dir(runtime)
        await d.ask_router("create_stream", "held", a)
        await _feed(d, "held", 0, 2)
        # Frames keep arriving (through a replica whose cache still says shard a) while the
        # stream moves; a question is asked in the middle.
        feeding = asyncio.ensure_future(_feed(d, "held", 2, 20))
        await asyncio.sleep(0.05)
        moving = asyncio.ensure_future(d.ask_router("migrate", "held", b))
        asking = asyncio.ensure_future(_ask(d, "held"))
        acks, moved, _ = await asyncio.gather(feeding, moving, asking)
        info = await d.call("held", "stream_info")
        replay = await d.call("held", "append_frames", 21, _frames(2, 42), [42.0, 43.0])
        return acks, moved, info, replay

    acks, moved, info, replay = run(go())
    assert moved["target"] == b and info["shard"] == b
    assert [x["seq"] for x in acks] == list(range(2, 22)) and not any(x["duplicate"] for x in acks)
    assert info["frames"] == 44 and info["last_seq"] == 21  # none lost, none twice
    assert replay["duplicate"]  # the seq survived the move
    _cleanup(runtime, "held")


def test_rebalancing_moves_streams_off_a_skewed_shard(runtime):
    a, b = runtime.shard_names
    sids = [f"skew{i}" for i in range(4)]

    async def go():
        d = await _dir(runtime)
        for s in sids:
            await d.ask_router("create_stream", s, a)
            await _feed(d, s, 0, 1)
        answers = {s: await _ask(d, s) for s in sids}
        moves = await d.ask_router("rebalance")
        where = await d.ask_router("list_streams")
        again = await d.ask_router("rebalance")
        return answers, moves, where, again

    answers, moves, where, again = run(go())
    assert len(moves) == 2 and all(m["source"] == a and m["target"] == b for m in moves)
    assert sorted(where[s] for s in sids) == [a, a, b, b]
    assert again == []
    _cleanup(runtime, *sids)


def test_a_restarted_router_loses_no_stream_and_mends_what_its_death_cut(runtime):
    a, b = runtime.shard_names

    async def setup():
        d = await _dir(runtime)
        for i in range(3):
            await d.ask_router("create_stream", f"keep{i}")
        await d.ask_router("create_stream", "half-moved", a)
        await _feed(d, "half-moved", 0, 1)
        before = await d.ask_router("list_streams")
        # What a router dying at the wrong moment leaves: a stream a shard opened but the map never
        # recorded, and a move begun (the source frozen) but never finished.
        shard_a, shard_b = (ray.get_actor(n, namespace=runtime.namespace) for n in (a, b))
        await shard_b.open_stream.remote("orphan")
        await shard_a.migration_begin.remote("half-moved")
        return before

    before = run(setup())
    ray.kill(ray.get_actor(runtime.router_name, namespace=runtime.namespace), no_restart=False)

    async def after():
        # ray.kill returns before the old instance is gone: `ready` may still be answered by it,
        # and the next call then meets the restart. Retry until the restarted router answers.
        from ray.exceptions import ActorUnavailableError

        for _ in range(100):
            router = await connect_runtime(runtime)  # Ray restarts it; it re-reads the map, reconciles
            try:
                listed = await router.list_streams.remote()
                break
            except ActorUnavailableError:
                await asyncio.sleep(0.3)
        d = StreamDirectory(runtime, router)
        fresh = await router.create_stream.remote("keep-new")
        acks = await _feed(d, "half-moved", 1, 1)  # served again, not held
        return listed, fresh, acks

    listed, fresh, acks = run(after())
    assert listed == {**before, "orphan": b}
    assert fresh["shard"] in runtime.shard_names
    assert acks[0]["seq"] == 1
    _cleanup(runtime, "keep0", "keep1", "keep2", "keep-new", "half-moved", "orphan")


def test_a_broken_engine_fails_its_health_check_and_gets_no_new_streams(runtime):
    a, b = runtime.shard_names

    async def go():
        d = await _dir(runtime)
        await d.ask_router("create_stream", "doomed", a)
        with pytest.raises(Exception) as crash:
            await d.call("doomed", "append_text", BREAK_TEXT, 0.0)  # the engine breaks: its probe fails
        health = await d.ask_router("health")
        placed = [await d.ask_router("create_stream", f"after{i}") for i in range(2)]
        return crash.value, health, placed

    crash, health, placed = run(go())
    assert getattr(crash, "code", None) == "engine_failure"
    assert health[a] != "ok" and health[b] == "ok"
    with pytest.raises(Exception, match="engine broken"):
        ray.get(ray.get_actor(a, namespace=runtime.namespace).check_health.remote())
    assert all(p["shard"] == b for p in placed)
