"""StreamDurability: a shard's snapshots and its rebuild of a stream from a log (docs/reliability.md).

Held by `ShardActor` (shard.py) when frame logs are on; the actor's `recover_stream`,
`snapshot_stream` and `snapshot_stats` are one-line delegations to it. Constructed with what it
works on, and nothing else of the actor:

    shard           the shard's name (in messages and results)
    log             the shard's `ShardLog` (the streams' logs and their store)
    spec            the `DurabilitySpec` (snapshot cadence and limits)
    engine          the engine; its methods run only through `call`
    call            call(fn, *args): `fn` on the engine thread (`ShardActor._call`: a failure is
                    probed, and a broken engine raises `EngineFailedError`)
    append          append(stream_id, frames, stamps): frames queued into the engine
                    (`ShardActor._engine_append`); returns an awaitable of their ingestion
    streams         the shard's stream -> `StreamSlot` map, read only (what is served here)
    serve           serve(stream_id, last_seq): a rebuilt stream is served here from now on
    broken          broken() -> True once the engine is out of service
    hold_timeout_s  how long a snapshot waits for its stream (`ShardSpec.hold_timeout_s`)

Verbs:

- `rebuild(stream_id)`: rebuild a stream another shard held, from its snapshot (if any) and the
  frame log after it (`snapshots.py`, `log_replay.py`). The router holds the stream's requests
  off (503) until it returns, and maps the stream here only then: no request is answered from a
  half-rebuilt stream. A record that fails validation, or that the engine fails on while it
  passes its probe, raises `StreamQuarantinedError`: the half-built stream is dropped from the
  engine, the shard stays healthy, and the router quarantines that stream alone.
- `acknowledged(slot, frames)`: frames of a stream were acknowledged; every
  `DurabilitySpec.snapshot_every_frames` of them a snapshot is taken (`StreamSnapshots`): a base,
  after which its log is compacted, or a delta after the last part (`snapshot_max_deltas`); a
  rebuild imports base + deltas (`Engine.import_deltas`), and if the engine refuses the deltas,
  the base and the log after it.
- `snapshot(slot)`: one now (tests, operators); `stats()`: the snapshot figures.
- `closed(stream_id)`: the stream was closed: a snapshot still being written settles, its log
  is deleted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mosaic_ray.engine.interface import EngineError, OverloadedError, StreamExistsError, UnknownStreamError
from mosaic_ray.engine.snapshot_delta import part_bytes
from mosaic_ray.runtime.config import DurabilitySpec
from mosaic_ray.runtime.errors import EngineFailedError
from mosaic_ray.runtime.durability.frame_log import FrameLog
from mosaic_ray.runtime.durability.log_replay import replay
from mosaic_ray.runtime.durability.shard_log import ShardLog
from mosaic_ray.runtime.durability.snapshot_plan import base_only
from mosaic_ray.runtime.actors.snapshots import StreamSnapshots, plan_rebuild, without_snapshot
from mosaic_ray.runtime.actors.stream_slot import StreamSlot


class StreamDurability:
    def __init__(
        self, shard: str, log: ShardLog, spec: DurabilitySpec, engine: Any,
        call: Callable[..., Awaitable[Any]], append: Callable[..., Awaitable[Awaitable[int]]],
        streams: Mapping[str, StreamSlot], serve: Callable[[str, int], Any], broken: Callable[[], bool],
        hold_timeout_s: float,
    ) -> None:
        self._shard = shard
        self.log = log
        self._engine = engine
        self._call = call
        self._append = append
        self._streams = streams
        self._serve = serve
        self._broken = broken
        self.snapshots = self._make_snapshots(spec, hold_timeout_s)  # None: no snapshots

    async def rebuild(self, stream_id: str) -> dict[str, Any]:
        """Rebuild `stream_id` from its frame log and serve it here (its shard died, or the runtime
        restarted). The router holds the stream's requests off (503) until this returns."""
        if stream_id in self._streams:
            raise StreamExistsError(f"stream {stream_id!r} exists on {self._shard}")
        start = time.perf_counter()
        if not await self.log.exists(stream_id):
            raise UnknownStreamError(f"stream {stream_id!r} has no frame log")
        engine = self._engine
        plan = await asyncio.to_thread(plan_rebuild, self.log.store, stream_id)
        read_s = time.perf_counter() - start
        snapshot_bytes = sum(sum(part_bytes(p)) for p in plan.parts or ())
        if await self._call(engine.has_stream, stream_id):  # a replay cut short before
            await self._call(engine.close_stream, stream_id)
        while plan.parts is not None:
            try:
                await self._call(engine.import_deltas, stream_id, plan.parts)
                break
            except (EngineFailedError, OverloadedError):  # broken by a poison snapshot (quarantined), or
                raise  # no room here: the router tries again, later or on another shard
            except EngineError as exc:  # refused (another model, inconsistent): as if unreadable
                if plan.deltas:  # the base alone, and the log after it
                    plan = base_only(stream_id, plan, f"the engine refused base + {plan.deltas} deltas: {exc}")
                else:
                    plan = without_snapshot(stream_id, plan.whole, f"the engine refused it: {exc}")
        if plan.parts is None:
            await self._call(engine.open_stream, stream_id)
        imported = time.perf_counter()
        async def append(frames, stamps):  # queued, then waited for: a failure is its record's
            return await (await self._append(stream_id, frames, stamps))

        try:
            done = await replay(
                plan.records,
                append,
                lambda text, ts: self._call(engine.append_text, stream_id, text, ts),
                self.log.decode,
                self.log.spec.replay_batch_frames,
                lambda options: self._call(engine.configure_stream, stream_id, options),
                last_seq=plan.last_seq,
            )
        except BaseException:
            if not self._broken():
                await self._call(engine.close_stream, stream_id)
            raise
        self._serve(stream_id, done.last_seq)
        if self.snapshots is not None:
            self.snapshots.restored(stream_id, done.frames)
        # "frames" are the frames replayed (after the snapshot, when one was used)
        return {"id": stream_id, "shard": self._shard, "last_seq": done.last_seq, "frames": done.frames,
                "batches": done.batches, "texts": done.texts, "options": done.options, "skipped": done.skipped,
                "engine_calls": done.engine_calls, "records_replayed": len(plan.records),
                "snapshot_mark": plan.mark, "snapshot_last_seq": plan.last_seq if plan.mark is not None else None,
                "snapshot_deltas": plan.deltas,
                "snapshot_problem": plan.problem, "snapshot_bytes": snapshot_bytes,
                # where the time went: reading + decoding the snapshot parts and the log, importing
                # them into the engine, replaying the records after the last part
                "read_s": read_s, "import_s": imported - start - read_s,
                "replay_s": time.perf_counter() - imported, "seconds": time.perf_counter() - start}

    def acknowledged(self, slot: StreamSlot, frames: int) -> None:
        if self.snapshots is not None:
            self.snapshots.note(slot, frames)

    async def snapshot(self, slot: StreamSlot) -> dict[str, Any] | None:
        """Snapshot the stream now and compact its log; its figures, or None if not taken."""
        if self.snapshots is None:
            raise UnknownStreamError("snapshots are off on this shard (no log, or a store without them)")
        return await self.snapshots.take(slot)

    def stats(self) -> dict[str, Any]:
        snaps = self.snapshots
        if snaps is None:
            return {"enabled": False}
        return {"enabled": True, "every_frames": snaps.every_frames, "taken": snaps.taken, "failed": snaps.failed,
                "deltas_taken": snaps.deltas_taken, "bytes_written": snaps.bytes_written,
                "max_deltas": snaps.max_deltas,
                "skipped": snaps.skipped, "max_bytes": snaps.max_bytes, "in_flight": snaps.in_flight,
                "streams": dict(snaps.last)}

    async def closed(self, stream_id: str) -> None:
        if self.snapshots is not None:
            await self.snapshots.settle(stream_id)  # a snapshot still being written
        await self.log.delete(stream_id)

    def _make_snapshots(self, spec: DurabilitySpec, hold_timeout_s: float) -> StreamSnapshots | None:
        """Snapshots need a cadence, and a store that keeps them (a custom one may not)."""
        if spec.snapshot_every_frames == 0:
            return None
        store = self.log.store
        if type(store).put_snapshot is FrameLog.put_snapshot or type(store).truncate_before is FrameLog.truncate_before:
            return None
        deltas = spec.snapshot_max_deltas if type(store).put_delta is not FrameLog.put_delta else 0
        streams = self._streams
        return StreamSnapshots(store, spec.snapshot_every_frames, self._call, self._engine.export_delta,
                               lambda sid, slot: streams.get(sid) is slot, hold_timeout_s,
                               size=self._stream_kv_bytes, max_bytes=spec.snapshot_max_bytes,
                               max_deltas=deltas, rebase_ratio=spec.snapshot_rebase_ratio)

    def _stream_kv_bytes(self, stream_id: str) -> int:
        """The stream's KV bytes (host pool + device), on the engine thread (via `call`)."""
        info = self._engine.stream_info(stream_id)
        return int(info.get("kv_bytes_host", 0)) + int(info.get("kv_bytes_device", 0))
