"""RecoveryManager on its own: a fake set of shards (`RecoveryShards`), an in-memory map and frame
log; no Ray, no router. A dead shard's streams are rebuilt on a live shard, refused meanwhile;
what a failed rebuild leaves (retried, lost, quarantined); orphans found in the logs; drain."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from types import SimpleNamespace

import pytest
import ray

from mosaic_ray.engine.interface import UnknownStreamError
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import (
    ShardUnavailableError,
    ShuttingDownError,
    StreamQuarantinedError,
    StreamRecoveringError,
)
from mosaic_ray.runtime.durability.frame_log import MemoryFrameLog, OpenRecord
from mosaic_ray.runtime.placement.recovery import RecoveryManager
from mosaic_ray.runtime.placement.stream_map import StreamMap
from tests.runtime.shard_fixtures import MemoryMapStore

S0, S1 = "rt:shard:0", "rt:shard:1"


def _remote(fn):
    return SimpleNamespace(remote=fn)


class _Handle:
    """A shard actor's handle: `ready` (waits for `started`, or raises `died`) and `drain`."""

    def __init__(self, name: str, started: asyncio.Event | None = None, died: bool = False) -> None:
        async def ready():
            if died:
                raise ray.exceptions.ActorDiedError()
            if started is not None:
                await started.wait()
            return name

        async def drain(timeout_s: float):
            return {"shard": name, "timeout_s": timeout_s}

        self.ready, self.drain = _remote(ready), _remote(drain)


class FakeShards:
    """`RecoveryShards`: `recover_stream` answered by `rebuild(shard, stream)`; a replacement's
    `ready` waits for `replacement_started`."""

    def __init__(self, rebuild, names=(S0, S1)) -> None:
        self.rebuild = rebuild
        self.handles = {n: _Handle(n) for n in names}
        self.unhealthy: dict[str, str] = {}
        self.calls: list[tuple[str, str, tuple]] = []
        self.reserved: Counter[str] = Counter()
        self.killed: list[str] = []
        self.replacement_started = asyncio.Event()

    def names(self):
        return sorted(self.handles)

    def handle(self, shard):
        return self.handles.get(shard)

    async def call(self, shard, method, *args):
        self.calls.append((shard, method, args))
        assert self.reserved[shard] >= 1, "a rebuild is counted on its target while it runs"
        return await self.rebuild(shard, *args)

    async def by_load(self):
        """Healthy shards, fewest rebuilds in flight first (ties: the last name first)."""
        live = [n for n in reversed(self.names()) if n not in self.unhealthy]
        if not live:
            raise ShardUnavailableError("no healthy shard")
        return sorted(live, key=lambda n: self.reserved[n])

    @contextmanager
    def reserve(self, shard):
        self.reserved[shard] += 1
        try:
            yield
        finally:
            self.reserved[shard] -= 1

    def mark_unhealthy(self, shard, reason):
        self.unhealthy[shard] = reason

    def stale(self):
        pass

    def spawn(self, shard):
        return _Handle(shard, self.replacement_started)

    def kill(self, shard):
        self.killed.append(shard)

    def install(self, shard, handle):
        self.handles[shard] = handle
        self.unhealthy.pop(shard, None)


def _manager(rebuild, mapped: dict[str, str], logged=(), logs: bool = True, **durability):
    cfg = RuntimeConfig(name="rt", num_shards=2, shard={"start_timeout_s": 1.0},
                        durability={"store": "memory", "recovering_retry_after_s": 3.0, **durability})
    frame_log = MemoryFrameLog()
    for sid in logged:
        frame_log.append(sid, [OpenRecord(0.0)])
    streams = StreamMap(MemoryMapStore(mapped))
    shards = FakeShards(rebuild)
    locks: dict[str, asyncio.Lock] = {}

    @asynccontextmanager
    async def lock(sid):
        async with locks.setdefault(sid, asyncio.Lock()):
            yield

    return RecoveryManager(cfg, frame_log if logs else None, streams, shards, lock), streams, shards, frame_log


async def _until(pred, timeout_s: float = 5.0) -> None:
    async def wait():
        while not pred():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout_s)


def test_a_dead_shards_streams_are_refused_meanwhile_then_rebuilt_on_a_live_shard():
    async def go():
        gate = asyncio.Event()

        async def rebuild(shard, sid):
            await gate.wait()
            return {"frames": 5}

        rec, streams, shards, _ = _manager(rebuild, {"a": S0, "b": S0, "c": S1})
        rec.shard_died(S0, "the actor died")
        assert rec.is_dead(S0) and S0 in shards.unhealthy
        assert rec.recovery_status()["recovering"] == {"a": S0, "b": S0}
        with pytest.raises(StreamRecoveringError) as err:
            rec.refuse_if_recovering("a")
        assert err.value.retry_after_s == 3.0
        rec.refuse_if_recovering("c")  # its shard lives: served as ever
        gate.set()
        await _until(lambda: not rec.recovering_ids())
        assert dict(streams.items()) == {"a": S1, "b": S1, "c": S1}
        assert sorted((s, m, a) for s, m, a in shards.calls) == [(S1, "recover_stream", ("a",)),
                                                                (S1, "recover_stream", ("b",))]
        episode = rec.recovery_status()["episodes"][0]
        assert episode["from"] == S0 and episode["streams"] == 2 and episode["frames"] == 10
        assert episode["seconds"] is not None
        assert sorted((r["id"], r["target"], r["frames"]) for r in episode["rebuilds"]) == [("a", S1, 5), ("b", S1, 5)]
        rec.refuse_if_recovering("a")
        assert rec.is_dead(S0)  # its replacement is not ready yet
        shards.replacement_started.set()
        await _until(lambda: not rec.is_dead(S0))
        assert S0 not in shards.unhealthy and S0 in shards.killed

    asyncio.run(go())


def test_a_poison_log_quarantines_its_stream_alone_and_it_is_never_tried_again():
    async def go():
        async def rebuild(shard, sid):
            if sid == "poison":
                raise StreamQuarantinedError("record 3 fails validation")
            return {"frames": 1}

        rec, streams, shards, _ = _manager(rebuild, {"poison": S0, "ok": S0})
        rec.shard_died(S0, "")
        await _until(lambda: rec.recovering_ids() == ["poison"] and rec.recovery_status()["quarantined"])
        with pytest.raises(StreamQuarantinedError, match="record 3 fails validation"):
            rec.refuse_if_recovering("poison")
        assert rec.is_recovering("poison") and streams.get("ok") == S1
        rec.retry()
        await asyncio.sleep(0.05)
        assert [c[2] for c in shards.calls].count(("poison",)) == 1

    asyncio.run(go())


def test_a_failed_rebuild_is_tried_again_and_a_stream_without_a_log_is_dropped():
    async def go():
        tries = Counter()

        async def rebuild(shard, sid):
            tries[sid] += 1
            if sid == "gone":
                raise UnknownStreamError("no frame log")
            if tries[sid] == 1:
                raise RuntimeError("the target died mid-replay")
            return {"frames": 2}

        rec, streams, _, _ = _manager(rebuild, {"flaky": S0, "gone": S0})
        rec.shard_died(S0, "")
        await _until(lambda: rec.recovery_status()["failed_attempts"] == 1)
        assert "gone" not in streams and not rec.is_recovering("gone")
        assert "the target died" in rec.recovery_status()["errors"]["flaky"]
        await _until(lambda: not rec.recovering_ids())  # after the backoff
        assert streams.get("flaky") == S1 and tries["flaky"] == 2 and not rec.recovery_status()["errors"]

    asyncio.run(go())


def test_orphans_in_the_logs_are_rebuilt_at_start_and_a_deleted_recovering_stream_is_forgotten():
    async def go():
        gate = asyncio.Event()

        async def rebuild(shard, sid):
            await gate.wait()
            return {"frames": 0}

        rec, streams, _, frame_log = _manager(rebuild, {}, logged=["held", "orphan", "doomed"])
        await rec.recover_orphans({"held"})
        assert rec.recovery_status()["recovering"] == {"orphan": "log", "doomed": "log"}
        assert await rec.forget("doomed") and not await rec.forget("held")
        assert frame_log.list_streams() == ["held", "orphan"]
        gate.set()
        await _until(lambda: not rec.recovering_ids())
        assert dict(streams.items()) == {"orphan": S1}

    asyncio.run(go())


def test_an_ingress_report_checks_the_shard_and_drain_refuses_changes():
    async def go():
        async def rebuild(shard, sid):
            return {"frames": 0}

        rec, _, shards, _ = _manager(rebuild, {})
        assert not await rec.shard_failed(S1) and not await rec.shard_failed("nonesuch")
        shards.handles[S0] = _Handle(S0, died=True)
        assert await rec.shard_failed(S0) and rec.is_dead(S0)
        rec.refuse_if_draining()
        assert await rec.drain(2.0) == {S1: {"shard": S1, "timeout_s": 2.0}}  # the dead one is skipped
        with pytest.raises(ShuttingDownError):
            rec.refuse_if_draining()

    asyncio.run(go())


def test_with_logs_off_a_dead_shards_streams_are_not_held_as_recovering():
    async def go():
        async def rebuild(shard, sid):
            raise AssertionError("nothing to rebuild from")

        rec, streams, shards, _ = _manager(rebuild, {"a": S0}, logs=False)
        rec.shard_died(S0, "")
        await asyncio.sleep(0.05)
        assert not rec.recovering_ids() and streams.get("a") == S0 and not shards.calls

    asyncio.run(go())


def test_rebuilds_per_shard_are_bounded_and_a_started_replacement_takes_its_share():
    async def go():
        release = asyncio.Event()
        running: Counter[str] = Counter()
        most: Counter[str] = Counter()

        async def rebuild(shard, sid):
            running[shard] += 1
            most[shard] = max(most[shard], running[shard])
            try:
                if sid in ("a", "b"):
                    await release.wait()  # slow rebuilds, on the live shard
                return {"frames": 1}
            finally:
                running[shard] -= 1

        rec, streams, shards, _ = _manager(rebuild, {"a": S0, "b": S0, "c": S0, "d": S0},
                                           replay_streams_per_shard=2)
        rec.shard_died(S0, "the actor died")
        await _until(lambda: running[S1] == 2)
        await asyncio.sleep(0.3)
        assert len(shards.calls) == 2  # S1 is full, S0 not back: c and d wait
        shards.replacement_started.set()  # the replacement starts: the waiting streams go there
        await _until(lambda: not {"c", "d"} & set(rec.recovering_ids()))
        assert {streams.get("c"), streams.get("d")} == {S0}
        release.set()
        await _until(lambda: not rec.recovering_ids())
        assert dict(streams.items()) == {"a": S1, "b": S1, "c": S0, "d": S0}
        assert max(most.values()) <= 2
        rebuilds = rec.recovery_status()["episodes"][0]["rebuilds"]
        assert sorted((r["id"], r["target"]) for r in rebuilds) == [("a", S1), ("b", S1), ("c", S0), ("d", S0)]

    asyncio.run(go())
