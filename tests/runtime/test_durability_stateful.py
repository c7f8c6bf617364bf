"""A stateful property test of the durability layer (issue 20): random sequences of accepted and
refused appends (with and without seq, alone and in concurrent bursts), duplicates, snapshots,
shard kills and whole-runtime restarts across two tenants, on in-process shards (the real
ShardActor, IngestQueue, LogOrder, snapshots and replay; the fake engine; one shared in-memory
frame log) and the router's quota rule. After every step:

- every acknowledged frame is in its stream exactly once, in order, and no refused frame is;
- a stream's last_seq is its last acknowledged seq and never goes back;
- the shard is healthy;
- no tenant holds more streams than its quota, counting the streams being rebuilt.

A "kill" happens between requests (the shard's snapshots in flight settled first): a shard dying
mid-request is the Ray chaos tests' part. Bounded for CI: MAX_EXAMPLES x STEPS steps of
milliseconds each.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.placement.router import held_prefixed
from mosaic_ray.runtime.placement.stream_map import StreamMap
from tests.runtime.fake_engine import frame_feature
from tests.runtime.shard_fixtures import MemoryMapStore, forget_store, local_shard, shared_store, stop_local

MAX_EXAMPLES = 60
STEPS = 40
TENANTS = ("t1:", "t2:")
QUOTA = 2  # streams per tenant
SNAPSHOT_EVERY = 5  # frames: snapshots and compaction happen within a few steps
_RUNS = itertools.count()


def _frame(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value % 256, np.uint8)


class Durability(RuleBasedStateMachine):
    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.runtime = f"stateful-{next(_RUNS)}"
        forget_store(self.runtime)
        self.loop = asyncio.new_event_loop()
        self.shard_index = 0
        self.shard = self._run(self._new_shard())
        # the router's side: the map and the streams being rebuilt (what its quota rule reads)
        self.router = SimpleNamespace(_map=StreamMap(MemoryMapStore()), _recovering={})
        self.acked: dict[str, list[int]] = {}  # stream -> values of its acknowledged frames, in order
        self.last_seq: dict[str, int] = {}
        self.last_ts: dict[str, float] = {}
        self.batches: dict[str, tuple[int, int, float]] = {}  # stream -> its last acked (seq, value, ts)
        self.values = itertools.count(1)

    # ------------------------------------------------------------------ helpers
    def _run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _new_shard(self):
        shard = local_shard(self.runtime, self.shard_index, snapshot_every_frames=SNAPSHOT_EVERY)
        self.shard_index += 1
        return shard

    def _held(self, tenant: str) -> int:
        return held_prefixed(self.router._map, self.router._recovering, tenant)

    def _served(self, sid: str) -> bool:
        return sid in self.acked and sid not in self.router._recovering

    async def _append(self, sid: str, seq: int | None, value: int, ts: float):
        try:
            return await self.shard.append_frames(sid, seq, [_frame(value)], [ts])
        except EngineError as exc:
            return exc

    def _record(self, sid: str, value: int, ts: float, ack, seq: int | None = None) -> None:
        """Fold an acknowledged new batch into the model (sent with `seq`, or None: the next)."""
        assert not isinstance(ack, EngineError) and not ack["duplicate"], ack
        assert ack["seq"] == (self.last_seq[sid] + 1 if seq is None else seq), (ack, self.last_seq[sid])
        self.acked[sid].append(value)
        self.last_seq[sid] = ack["seq"]
        self.last_ts[sid] = ts
        self.batches[sid] = (ack["seq"], value, ts)

    # ------------------------------------------------------------------ rules
    @initialize()
    def start(self) -> None:
        pass

    @rule(target=streams, tenant=st.sampled_from(TENANTS), n=st.integers(0, 3))
    def create(self, tenant: str, n: int):
        sid = f"{tenant}cam-{n}"
        exists = sid in self.acked
        if exists or self._held(tenant) >= QUOTA:
            return sid  # refused (exists, or the quota): nothing changes
        self._run(self.shard.open_stream(sid))
        self.router._map.set(sid, self.shard.name)
        self.acked[sid], self.last_seq[sid], self.last_ts[sid] = [], -1, 0.0
        return sid

    @rule(sid=streams, with_seq=st.booleans())
    def append_accepted(self, sid: str, with_seq: bool) -> None:
        if not self._served(sid):
            return
        value, ts = next(self.values), self.last_ts[sid] + 1.0
        seq = self.last_seq[sid] + 1 if with_seq else None
        self._record(sid, value, ts, self._run(self._append(sid, seq, value, ts)), seq)

    @rule(sid=streams, poison=st.booleans())
    def append_refused(self, sid: str, poison: bool) -> None:
        """Back in time (the engine refuses it) or a time no engine may get (the shard does)."""
        if not self._served(sid):
            return
        ts = 1e300 if poison or self.last_ts[sid] < 1.0 else self.last_ts[sid] - 0.5
        ack = self._run(self._append(sid, None, next(self.values), ts))
        assert isinstance(ack, EngineError) and ack.status == 422, ack

    @rule(sid=streams)
    def burst(self, sid: str) -> None:
        """At once: a duplicate of the last acknowledged batch, a new batch without seq and its
        duplicate (sent with the seq it will get), one going back in time, one more new batch.
        They meet in one coalesced group; the refused one must take no seq."""
        if not self._served(sid):
            return
        t, last = self.last_ts[sid], self.last_seq[sid]
        first, refused, second = next(self.values), next(self.values), next(self.values)
        old = self.batches.get(sid)

        async def go():
            return await asyncio.gather(
                self._append(sid, old[0], old[1], old[2]) if old else asyncio.sleep(0),
                self._append(sid, None, first, t + 1.0),
                self._append(sid, last + 1, first, t + 1.0),
                self._append(sid, None, refused, t + 0.5),
                self._append(sid, None, second, t + 2.0),
            )

        old_dup, ack_first, first_dup, ack_refused, ack_second = self._run(go())
        if old:
            assert old_dup["duplicate"], old_dup
        self._record(sid, first, t + 1.0, ack_first)
        assert not isinstance(first_dup, EngineError) and first_dup["duplicate"], first_dup
        assert isinstance(ack_refused, EngineError) and ack_refused.status == 422, ack_refused
        self._record(sid, second, t + 2.0, ack_second)

    @rule(sid=streams)
    def duplicate(self, sid: str) -> None:
        if not self._served(sid) or sid not in self.batches:
            return
        seq, value, ts = self.batches[sid]
        ack = self._run(self._append(sid, seq, value, ts))
        assert not isinstance(ack, EngineError) and ack["duplicate"] and ack["frames_added"] == 0, ack

    @rule()
    def kill_shard(self) -> None:
        """The shard dies; the router keeps its map, every stream of it is being rebuilt."""
        self._kill()
        for sid in self.acked:
            self.router._recovering.setdefault(sid, "dead")

    @rule()
    def restart_runtime(self) -> None:
        """Every actor and the stream map are gone; the streams are found in the logs."""
        self._kill()
        self.router._map = StreamMap(MemoryMapStore())
        for sid in shared_store(None, self.runtime).list_streams():
            self.router._recovering.setdefault(sid, "log")

    @rule(sid=consumes(streams))
    def delete(self, sid: str) -> None:
        if not self._served(sid):
            return
        self._run(self.shard.close_stream(sid))
        self.router._map.delete(sid)
        for table in (self.acked, self.last_seq, self.last_ts, self.batches):
            table.pop(sid, None)

    @rule()
    def rebuild(self) -> None:
        for sid in sorted(self.router._recovering):
            info = self._run(self.shard.recover_stream(sid))
            assert info["last_seq"] == self.last_seq[sid], (sid, info)
            self.router._recovering.pop(sid)
            self.router._map.set(sid, self.shard.name)

    def _kill(self) -> None:
        async def settle():
            if self.shard._durability.snapshots is not None:
                for sid in list(self.shard._slots):
                    await self.shard._durability.snapshots.settle(sid)

        self._run(settle())
        stop_local(self.shard)
        self.shard = self._run(self._new_shard())

    # ------------------------------------------------------------------ invariants
    @invariant()
    def every_acknowledged_frame_once_and_no_refused_frame(self) -> None:
        for sid, values in self.acked.items():
            if not self._served(sid):
                continue
            feats = self._run(self.shard._call(self.shard._engine.export_stream, sid))["tensors"]["features"]
            expected = [frame_feature(_frame(v)) for v in values]
            assert feats.shape[0] == len(values), (sid, feats.shape[0], len(values))
            if values:
                assert np.array_equal(feats.numpy(), np.stack(expected)), sid

    @invariant()
    def last_seq_is_the_last_acknowledged_and_never_goes_back(self) -> None:
        for sid in self.acked:
            if self._served(sid):
                info = self._run(self.shard.stream_info(sid))
                assert info["last_seq"] == self.last_seq[sid], (sid, info["last_seq"], self.last_seq[sid])

    @invariant()
    def the_shard_is_healthy(self) -> None:
        self._run(self.shard.check_health())

    @invariant()
    def quotas_hold(self) -> None:
        for tenant in TENANTS:
            held = {sid for sid in self.acked if sid.startswith(tenant)}
            held |= {sid for sid in self.router._recovering if sid.startswith(tenant)}
            assert len(held) <= QUOTA and self._held(tenant) == len(held), (tenant, held)

    def teardown(self) -> None:
        self._kill()
        stop_local(self.shard)
        self.loop.close()
        forget_store(self.runtime)


Durability.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDurability = Durability.TestCase
