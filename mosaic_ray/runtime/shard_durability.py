"""ShardDurability: a shard's verbs for recovery and shutdown (docs/reliability.md).

A mixin of `ShardActor` (shard.py), kept apart so each file holds one concept. It uses the
actor's `_log` (`ShardLog`, None when logs are off), `_slots`, `_moved`, `_spec`, `_engine_append`,
`_engine`, `_call`, `_fatal`, `_draining` and `name`.

- `recover_stream`: rebuild a stream another shard held, from its snapshot (if any) and the
  frame log after it (`snapshots.py`, `log_replay.py`). The router holds the stream's requests
  off (503) until it returns, and maps the stream here only then: no request is answered from a
  half-rebuilt stream. A record that fails validation, or that the engine fails on while it
  passes its probe, raises `StreamQuarantinedError`: the half-built stream is dropped from the
  engine, the shard stays healthy, and the router quarantines that stream alone.
- snapshots: every `DurabilitySpec.snapshot_every_frames` acknowledged frames of a stream
  (`StreamSnapshots`, made by `_make_snapshots`): a base, after which its log is compacted, or a
  delta after the last part (`snapshot_max_deltas`); a rebuild imports base + deltas
  (`Engine.import_deltas`), and if the engine refuses the deltas, the base and the log after it;
  `snapshot_stream` takes one now (tests, operators).
- `drain`: stop taking requests (503 `ShuttingDownError`, raised by the actor's `_slot`), let the
  admitted ones finish, fsync the logs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mosaic_ray.engine.interface import EngineError, OverloadedError, StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import DurabilitySpec
from mosaic_ray.runtime.errors import EngineFailedError
from mosaic_ray.runtime.frame_log import FrameLog
from mosaic_ray.runtime.log_replay import replay
from mosaic_ray.runtime.snapshot_plan import base_only
from mosaic_ray.runtime.snapshots import StreamSnapshots, plan_rebuild, without_snapshot
from mosaic_ray.runtime.stream_slot import StreamSlot


class ShardDurability:
    async def recover_stream(self, stream_id: str) -> dict[str, Any]:
        """Rebuild `stream_id` from its frame log and serve it here (its shard died, or the runtime
        restarted). The router holds the stream's requests off (503) until this returns."""
        if self._log is None:
            raise UnknownStreamError(f"stream {stream_id!r}: frame logs are off, nothing to rebuild from")
        if stream_id in self._slots:
            raise StreamExistsError(f"stream {stream_id!r} exists on {self.name}")
        start = time.perf_counter()
        if not await self._log.exists(stream_id):
            raise UnknownStreamError(f"stream {stream_id!r} has no frame log")
        plan = await asyncio.to_thread(plan_rebuild, self._log.store, stream_id)
        if await self._call(self._engine.has_stream, stream_id):  # a replay cut short before
            await self._call(self._engine.close_stream, stream_id)
        while plan.parts is not None:
            try:
                await self._call(self._engine.import_deltas, stream_id, plan.parts)
                break
            except (EngineFailedError, OverloadedError):  # broken by a poison snapshot (quarantined), or
                raise  # no room here: the router tries again, later or on another shard
            except EngineError as exc:  # refused (another model, inconsistent): as if unreadable
                if plan.deltas:  # the base alone, and the log after it
                    plan = base_only(stream_id, plan, f"the engine refused base + {plan.deltas} deltas: {exc}")
                else:
                    plan = without_snapshot(stream_id, plan.whole, f"the engine refused it: {exc}")
        if plan.parts is None:
            await self._call(self._engine.open_stream, stream_id)
        async def append(frames, stamps):  # queued, then waited for: a failure is its record's
            return await (await self._engine_append(stream_id, frames, stamps))

        try:
            done = await replay(
                plan.records,
                append,
                lambda text, ts: self._call(self._engine.append_text, stream_id, text, ts),
                self._log.decode,
                self._log.spec.replay_batch_frames,
                lambda options: self._call(self._engine.configure_stream, stream_id, options),
                last_seq=plan.last_seq,
            )
        except BaseException:
            if self._fatal is None:
                await self._call(self._engine.close_stream, stream_id)
            raise
        self._slots[stream_id] = StreamSlot(stream_id, self._spec.rate_window_s, done.last_seq)
        self._moved.pop(stream_id, None)
        if self._snapshots is not None:
            self._snapshots.restored(stream_id, done.frames)
        # "frames" are the frames replayed (after the snapshot, when one was used)
        return {"id": stream_id, "shard": self.name, "last_seq": done.last_seq, "frames": done.frames,
                "batches": done.batches, "texts": done.texts, "options": done.options, "skipped": done.skipped,
                "engine_calls": done.engine_calls, "records_replayed": len(plan.records),
                "snapshot_mark": plan.mark, "snapshot_last_seq": plan.last_seq if plan.mark is not None else None,
                "snapshot_deltas": plan.deltas,
                "snapshot_problem": plan.problem, "seconds": time.perf_counter() - start}

    async def snapshot_stream(self, stream_id: str) -> dict[str, Any] | None:
        """Snapshot `stream_id` now and compact its log; its figures, or None if not taken."""
        if self._snapshots is None:
            raise UnknownStreamError("snapshots are off on this shard (no log, or a store without them)")
        return await self._snapshots.take(self._slot(stream_id))

    async def snapshot_stats(self) -> dict[str, Any]:
        snaps = self._snapshots
        if snaps is None:
            return {"enabled": False}
        return {"enabled": True, "every_frames": snaps.every_frames, "taken": snaps.taken, "failed": snaps.failed,
                "deltas_taken": snaps.deltas_taken, "bytes_written": snaps.bytes_written,
                "max_deltas": snaps.max_deltas,
                "skipped": snaps.skipped, "max_bytes": snaps.max_bytes, "in_flight": snaps.in_flight,
                "streams": dict(snaps.last)}

    def _make_snapshots(self, dur: DurabilitySpec) -> StreamSnapshots | None:
        """Snapshots need logs, a cadence, and a store that keeps them (a custom one may not)."""
        if self._log is None or dur.snapshot_every_frames == 0:
            return None
        store = self._log.store
        if type(store).put_snapshot is FrameLog.put_snapshot or type(store).truncate_before is FrameLog.truncate_before:
            return None
        deltas = dur.snapshot_max_deltas if type(store).put_delta is not FrameLog.put_delta else 0
        return StreamSnapshots(store, dur.snapshot_every_frames, self._call, self._engine.export_delta,
                               lambda sid, slot: self._slots.get(sid) is slot, self._spec.hold_timeout_s,
                               size=self._stream_kv_bytes, max_bytes=dur.snapshot_max_bytes,
                               max_deltas=deltas, rebase_ratio=dur.snapshot_rebase_ratio)

    def _stream_kv_bytes(self, stream_id: str) -> int:
        """The stream's KV bytes (host pool + device), on the engine thread (via `_call`)."""
        info = self._engine.stream_info(stream_id)
        return int(info.get("kv_bytes_host", 0)) + int(info.get("kv_bytes_device", 0))

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Stop taking requests (503 `ShuttingDownError`), wait up to `timeout_s` for the admitted
        ones to finish, then fsync the frame logs. Returns how many were still running."""
        self._draining = True
        slots = list(self._slots.values())
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait_idle() for s in slots)), timeout_s)
        except asyncio.TimeoutError:
            pass
        if self._log is not None:
            await self._log.sync()
        return {"shard": self.name, "streams": len(self._slots), "unfinished": sum(s.busy for s in slots)}
