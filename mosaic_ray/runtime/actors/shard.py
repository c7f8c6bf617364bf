"""ShardActor: one GPU, one engine, the streams placed on it.

A Ray async actor (`num_gpus=1` in production; logical GPUs in tests). It owns an engine built
from an `EngineSpec` (the engine class is injected: a dotted factory path plus kwargs) and runs
every engine call on one dedicated thread (`EngineRunner`), so the actor's event loop stays free to
admit requests, coalesce ingest, report load and answer health checks while the GPU works.

Per stream (`StreamSlot`): requests are admitted, then run one at a time in arrival order; frame
batches are coalesced, deduplicated by seq and logged (`IngestQueue`), then handed to the engine's
step loop (`_engine_append`), whose scheduler batches the frames of all streams; a migrating stream
holds its requests and then redirects them (`StreamMovedError`) to its new shard.

Invariants:
- The engine is touched only from the runner thread: through `EngineGuard` (engine_guard.py;
  `_call`, `_engine_append`), and by `_deltas`' answer iterator.
- A request whose engine call raises anything but an `EngineError` fails alone (500
  `request_failed`) when the engine then passes a probe on a known-good input (`Engine.probe`);
  only when the probe fails too is the engine broken: `EngineGuard.fatal` remembers it and
  `check_health` raises from then on (so the router stops placing here and an operator or the
  recovery takes over). A hung engine fails `check_health` by timeout.
- A stream is either in `_slots` (served here), or in `_moved` (redirected), or unknown.
- With frame logs on (`DurabilitySpec`), a frame batch, text or option is acknowledged only after
  its record is in the stream's log (`shard_log.py`), written once the engine took it, in the
  engine's order (`log_order.py`): the log holds only what was accepted. `recover_stream`
  rebuilds a stream another shard held from that log (`StreamDurability`, shard_durability.py),
  and a draining shard (`drain`, at shutdown) refuses new requests with 503.

Collaborators, each constructed with what it needs (never the actor itself): `EngineGuard`
(engine calls, failure vs broken), `StreamDurability` (snapshots, rebuild from a log; None when
logs are off) and `MigrationEndpoint` (this shard's end of a move, shard_migration.py). The
remote methods that are theirs are one-line delegations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray

from mosaic_ray.engine.interface import AnswerEnd, AskRequest, EngineError, StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import DurabilitySpec, EngineSpec, MigrationSpec, ShardSpec
from mosaic_ray.runtime.actors.engine_guard import EngineGuard
from mosaic_ray.runtime.actors.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import (
    EngineFailedError,
    ShardBusyError,
    ShuttingDownError,
    StreamMovedError,
)
from mosaic_ray.runtime.actors.capacity import CapacityGate
from mosaic_ray.runtime.durability.frame_codec import EncodedFrame
from mosaic_ray.runtime.durability.frame_log import LogRecord
from mosaic_ray.runtime.actors.ingest import IngestQueue
from mosaic_ray.runtime.actors.load import LoadReport, StreamLoad
from mosaic_ray.runtime.durability.record_check import check_times
from mosaic_ray.runtime.actors.shard_durability import StreamDurability
from mosaic_ray.runtime.actors.shard_migration import MigrationEndpoint
from mosaic_ray.runtime.durability.shard_log import ShardLog, options_record, text_record
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import StreamSlot

log = logging.getLogger("mosaic_ray.runtime.actors.shard")

# engine stats passed on to /metrics besides the step loop's `step_*` counters, each only when the
# engine reports it (StreamEngine does); the engine's `frames_total` (frames through its model)
# comes as `frames_ingested_total` beside the shard's own `frames_total` (frames it accepted)
_ENGINE_FIGURES = ("busy_s_total", "ingest_lag_s_max", "ingest_lag_s_by_stream", "ttft_parts",
                   "pool_used_bytes", "pool_capacity_bytes", "kv_pool_used_bytes", "kv_pool_capacity_bytes",
                   "retrieval_tokens_total", "retrieval_copies_total", "retrieval_bytes_total", "clusters")


@ray.remote
class ShardActor:
    def __init__(
        self, name: str, engine: dict, shard: dict, migration: dict, durability: dict | None = None,
        runtime_name: str = "mosaic",
    ) -> None:
        self.name = name
        self._spec = ShardSpec(**shard)
        self._mig = MigrationSpec(**migration)
        self._runner = EngineRunner(name)
        self._engine = self._runner.call_blocking(EngineSpec(**engine).build)
        dur = DurabilitySpec(**(durability or {"enabled": False}))
        self._log = ShardLog(dur, runtime_name, self._spec.decode_threads) if dur.enabled else None
        self._draining = False
        self._meter = ShardMeter(self._spec.rate_window_s, self._spec.ttft_buckets_s)
        self._guard = EngineGuard(name, self._engine, self._runner, self._meter, self._spec.health_timeout_s)
        self._call, self._engine_append = self._guard.call, self._guard.append
        self._capacity = CapacityGate(self._spec.max_utilization, self._spec.capacity_window_s)
        self._ingest = IngestQueue(
            self._engine_append, self._meter, self._spec.max_pending_frames, self._spec.max_coalesce_frames,
            self._spec.decode_threads, log=self._log.write if self._log is not None else None,
            max_stream_pending_frames=self._spec.max_stream_pending_frames, queued=True,
        )
        self._slots: dict[str, StreamSlot] = {}
        self._moved: OrderedDict[str, str] = OrderedDict()
        self._durability = None if self._log is None else StreamDurability(
            name, self._log, dur, self._engine, self._call, self._engine_append, self._slots,
            self._serve, lambda: self._guard.fatal is not None, self._spec.hold_timeout_s)
        self._migrations = MigrationEndpoint(
            name, self._mig, self._engine, self._call, self._slots, self._slot, self._serve,
            self._remember_moved, self._log, self._meter)
        # Streams the engine already holds (an engine that restores state at start) are served.
        for sid in self._runner.call_blocking(self._engine.list_streams):
            self._slots[sid] = StreamSlot(sid, self._spec.rate_window_s)

    async def ready(self) -> str:
        return self.name

    # ------------------------------------------------------------------ durability (shard_durability.py)
    async def recover_stream(self, stream_id: str) -> dict[str, Any]:
        why_not = f"stream {stream_id!r}: frame logs are off, nothing to rebuild from"
        return await self._durable(why_not).rebuild(stream_id)

    async def snapshot_stream(self, stream_id: str) -> dict[str, Any] | None:
        return await self._durable(self._NO_SNAPSHOTS).snapshot(self._slot(stream_id))

    async def snapshot_stats(self) -> dict[str, Any]:
        return self._durability.stats() if self._durability is not None else {"enabled": False}

    # ------------------------------------------------------------------ migration (shard_migration.py)
    async def migration_begin(self, stream_id: str) -> dict[str, float]:
        return await self._migrations.begin(stream_id)

    async def migration_offer(self, stream_id: str, transport: str):
        return await self._migrations.offer(stream_id, transport)

    async def migration_send(self, stream_id: str) -> dict[str, float]:
        return await self._migrations.send(stream_id)

    async def migration_receive(self, offer) -> dict[str, float]:
        return await self._migrations.receive(offer)

    async def migration_finish(self, stream_id: str, moved_to: str) -> None:
        await self._migrations.finish(stream_id, moved_to)

    async def migration_abort(self, stream_id: str) -> None:
        await self._migrations.abort(stream_id)

    async def migration_abort_all(self) -> list[str]:
        return await self._migrations.abort_all()

    # ------------------------------------------------------------------ streams
    async def open_stream(self, stream_id: str) -> None:
        if stream_id in self._slots:
            raise StreamExistsError(f"stream {stream_id!r} exists")
        self._observe_capacity(await self._call(self._engine.stats))
        why = self._capacity.refusal(len(self._slots))
        if why is not None:
            raise ShardBusyError(why, self._capacity.retry_after_s())
        await self._call(self._engine.open_stream, stream_id)
        if self._log is not None:
            try:
                await self._log.opened(stream_id)
            except BaseException:
                await self._call(self._engine.close_stream, stream_id)
                raise
        self._serve(stream_id)

    async def close_stream(self, stream_id: str) -> None:
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s), slot.lock:
            await self._call(self._engine.close_stream, stream_id)
        slot.close()
        self._slots.pop(stream_id, None)
        if self._durability is not None:
            await self._durability.closed(stream_id)

    async def list_streams(self) -> list[str]:
        return sorted(self._slots)

    async def stream_info(self, stream_id: str) -> dict[str, Any]:
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s):
            info = await self._call(self._engine.stream_info, stream_id)
        return {**info, "id": stream_id, "shard": self.name, "last_seq": slot.last_seq,
                "ingest_fps": slot.ingest_rate.rate(), "queries_per_s": slot.query_rate.rate()}

    async def append_frames(
        self, stream_id: str, seq: int | None, frames: list[EncodedFrame | np.ndarray], timestamps: list[float]
    ) -> dict[str, Any]:
        """Frames as the ingress forwards them (compressed, checked) or as RGB arrays; decoded here."""
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s):
            ack = await self._ingest.submit(slot, seq, frames, timestamps)
        if self._durability is not None:
            self._durability.acknowledged(slot, ack["frames_added"])
        pruned = getattr(self._engine, "frames_pruned", None)  # engines that prune report it
        return {**ack, "stream_id": stream_id, **({"frames_pruned": pruned(stream_id)} if pruned else {})}

    async def configure_stream(self, stream_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Per-stream engine options (pruning, ...), in order with the stream's other requests."""
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s):
            return await self._logged(slot, options_record(options),
                                      lambda: self._call(self._engine.configure_stream, stream_id, options))

    async def append_text(self, stream_id: str, text: str, timestamp: float) -> None:
        check_times([timestamp])
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s):
            await self._logged(slot, text_record(text, timestamp),
                               lambda: self._call(self._engine.append_text, stream_id, text, timestamp))

    async def _logged(self, slot: StreamSlot, record: LogRecord, apply: Callable[[], Awaitable[Any]]) -> Any:
        """`apply` under the stream's lock; `record` logged once the engine took it, in the engine's
        order (`LogOrder`), and waited for off the lock (an entry ahead may need the lock)."""
        entry = None
        async with slot.lock:
            if self._log is not None:
                entry = slot.log_order.reserve()
            try:
                out = await apply()
            except BaseException:
                if entry is not None:
                    slot.log_order.drop(entry)
                raise
            if entry is not None:
                slot.log_order.fill(entry, [record])
        if entry is not None:
            await slot.log_order.durable(entry, self._log_writer(slot.stream_id))
        return out

    def _log_writer(self, stream_id: str):
        log = self._log
        return lambda records: log.write(stream_id, records)

    async def ask(self, stream_id: str, request: dict[str, Any], with_end: bool = False):
        """Stream the answer's text deltas (a Ray streaming generator: one object per delta); with
        `with_end`, then one dict {"finish_reason", "usage"} (`end_dict`) once the answer is complete."""
        async for item in self._deltas(stream_id, request, {}):
            if isinstance(item, str):
                yield item
            elif with_end:
                yield item.as_dict()

    async def answer(self, stream_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """The whole answer in one reply: {"text", "deltas", "ttft_s", "finish_reason", "usage"}
        (one RPC, not one per delta)."""
        timing: dict[str, float] = {}
        items = [d async for d in self._deltas(stream_id, request, timing)]
        parts = [d for d in items if isinstance(d, str)]
        ends = [d.as_dict() for d in items if isinstance(d, AnswerEnd)]
        return {"text": "".join(parts), "deltas": len(parts), "ttft_s": timing.get("ttft_s", 0.0),
                **(ends[-1] if ends else AnswerEnd().as_dict())}

    async def _deltas(self, stream_id: str, request: dict[str, Any], timing: dict[str, float]):
        """The stream's lock is held until the answer's first delta: its start and prefill are in
        order with the stream's other requests; after that, an engine that takes appends during
        answers (`Engine.appends_during_answers`) gets the stream's frames while it decodes."""
        slot = self._slot(stream_id)
        req = AskRequest(**request)
        early = getattr(self._engine, "appends_during_answers", False)
        async with slot.admit(self._spec.hold_timeout_s):
            with self._meter.question() as meter:  # waiting, then running: its end is counted
                await slot.lock.acquire()
                locked = True
                meter.running()
                slot.query_rate.add()
                try:
                    async for delta in self._runner.iterate(lambda: self._engine.ask_until_end(stream_id, req)):
                        ttft = meter.saw(delta)
                        if ttft is not None:
                            timing["ttft_s"] = ttft
                        if locked and early:
                            slot.lock.release()
                            locked = False
                        yield delta
                except EngineError:
                    raise
                except Exception as exc:
                    raise await self._guard.failure(exc) from None
                finally:
                    if locked:
                        slot.lock.release()

    # ------------------------------------------------------------------ load, health
    def _observe_capacity(self, stats: dict[str, Any]) -> None:
        if "busy_s_total" in stats:  # engines that measure their work (StreamEngine)
            self._capacity.observe(time.monotonic(), float(stats["busy_s_total"]))

    async def load(self) -> LoadReport:
        return self._report(await self._call(self._engine.stats))

    def _report(self, stats: dict[str, Any]) -> LoadReport:
        """The load report from the engine's stats (also a capacity sample)."""
        self._observe_capacity(stats)
        rates = [slot.rates() for slot in self._slots.values()]
        return LoadReport(
            shard=self.name,
            streams=len(self._slots),
            kv_bytes_device=int(stats.get("kv_bytes_device", 0)),
            kv_bytes_host=int(stats.get("kv_bytes_host", 0)),
            ingest_fps=sum(r[0] for r in rates),
            queries_per_s=sum(r[1] for r in rates),
            pending_frames=self._ingest.pending_frames,
            active_queries=self._meter.running,
            healthy=self._guard.fatal is None,
        )

    async def stream_loads(self) -> list[StreamLoad]:
        """Loads of the streams that may move now (not already migrating)."""
        ids = [sid for sid, slot in self._slots.items() if not slot.frozen]
        engine = self._engine
        infos = await self._call(lambda: {sid: engine.stream_info(sid) for sid in ids if engine.has_stream(sid)})
        return [
            StreamLoad(sid, int(i.get("kv_bytes_device", 0)) + int(i.get("kv_bytes_host", 0)),
                       *self._slots[sid].rates())
            for sid, i in infos.items() if sid in self._slots
        ]

    async def metrics(self) -> dict[str, Any]:
        stats = await self._call(self._engine.stats)
        report = self._report(stats)
        engine = {k: v for k, v in stats.items() if k.startswith("step_") or k in _ENGINE_FIGURES}
        if "frames_total" in stats:
            engine["frames_ingested_total"] = stats["frames_total"]
        util = self._capacity.utilization()
        return {**self._meter.snapshot(), **engine, **({"engine_utilization": util} if util is not None else {}),
                "shard": self.name, "streams": report.streams,
                "kv_bytes_device": report.kv_bytes_device, "kv_bytes_host": report.kv_bytes_host,
                "pending_frames": report.pending_frames, "active_queries": report.active_queries,
                "healthy": report.healthy}

    async def check_health(self) -> None:
        """Raise when the engine is broken or does not answer within `health_timeout_s`."""
        if self._guard.fatal is not None:
            raise EngineFailedError(f"engine broken: {type(self._guard.fatal).__name__}: {self._guard.fatal}")
        try:
            await asyncio.wait_for(self._call(self._engine.stats), self._spec.health_timeout_s)
        except asyncio.TimeoutError:
            raise EngineFailedError(f"engine did not answer within {self._spec.health_timeout_s} s") from None

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

    # ------------------------------------------------------------------ internals
    _NO_SNAPSHOTS = "snapshots are off on this shard (no log, or a store without them)"

    def _durable(self, why_not: str) -> StreamDurability:
        if self._durability is None:
            raise UnknownStreamError(why_not)
        return self._durability

    def _serve(self, stream_id: str, last_seq: int = -1, rates: tuple[float, float] = (0.0, 0.0)) -> None:
        """Serve `stream_id` here from now on (opened, rebuilt or received)."""
        self._slots[stream_id] = StreamSlot(stream_id, self._spec.rate_window_s, last_seq, rates)
        self._moved.pop(stream_id, None)

    def _remember_moved(self, stream_id: str, shard: str) -> None:
        self._moved[stream_id] = shard
        self._moved.move_to_end(stream_id)
        while len(self._moved) > self._spec.moved_memory:
            self._moved.popitem(last=False)

    def _slot(self, stream_id: str) -> StreamSlot:
        if self._draining:
            raise ShuttingDownError(f"shard {self.name} is shutting down")
        slot = self._slots.get(stream_id)
        if slot is not None:
            if slot.requests >= self._spec.max_stream_requests:  # bounded waiting: memory too
                raise ShardBusyError(f"stream {stream_id!r} has {slot.requests} requests in progress; retry", 1.0)
            return slot
        if stream_id in self._moved:
            raise StreamMovedError(stream_id, self._moved[stream_id])
        raise UnknownStreamError(f"stream {stream_id!r} not found")
