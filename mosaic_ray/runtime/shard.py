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
- Only `_call` and `_engine_append` touch the engine, and only from the runner thread.
- A request whose engine call raises anything but an `EngineError` fails alone (500
  `request_failed`) when the engine then passes a probe on a known-good input (`Engine.probe`);
  only when the probe fails too is the engine broken: the shard remembers it and `check_health`
  raises from then on (so the router stops placing here and an operator or the recovery takes
  over). A hung engine fails `check_health` by timeout.
- A stream is either in `_slots` (served here), or in `_moved` (redirected), or unknown.
- With frame logs on (`DurabilitySpec`), a frame batch, text or option is acknowledged only after
  its record is in the stream's log (`shard_log.py`), written once the engine took it, in the
  engine's order (`log_order.py`): the log holds only what was accepted. `recover_stream`
  rebuilds a stream another shard held from that log, and a draining shard (`drain`, at
  shutdown) refuses new requests with 503 (`shard_durability.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from mosaic_ray.engine.interface import AnswerEnd, AskRequest, EngineError, StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import DurabilitySpec, EngineSpec, MigrationSpec, RuntimeConfig, ShardSpec
from mosaic_ray.runtime.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import (
    EngineFailedError,
    RequestFailedError,
    ShardBusyError,
    ShuttingDownError,
    StreamMovedError,
)
from mosaic_ray.runtime.capacity import CapacityGate
from mosaic_ray.runtime.frame_codec import EncodedFrame
from mosaic_ray.runtime.frame_log import LogRecord
from mosaic_ray.runtime.ingest import IngestQueue, completed
from mosaic_ray.runtime.load import LoadReport, StreamLoad
from mosaic_ray.runtime.record_check import check_times
from mosaic_ray.runtime.shard_durability import ShardDurability
from mosaic_ray.runtime.shard_migration import ShardMigration
from mosaic_ray.runtime.shard_log import ShardLog, options_record, text_record
from mosaic_ray.runtime.shard_metrics import ShardMeter
from mosaic_ray.runtime.stream_slot import StreamSlot

log = logging.getLogger("mosaic_ray.runtime.shard")

# engine stats passed on to /metrics besides the step loop's `step_*` counters, each only when the
# engine reports it (StreamEngine does); the engine's `frames_total` (frames through its model)
# comes as `frames_ingested_total` beside the shard's own `frames_total` (frames it accepted)
_ENGINE_FIGURES = ("busy_s_total", "ingest_lag_s_max", "ingest_lag_s_by_stream", "ttft_parts",
                   "pool_used_bytes", "pool_capacity_bytes", "kv_pool_used_bytes", "kv_pool_capacity_bytes",
                   "retrieval_tokens_total", "retrieval_copies_total", "retrieval_bytes_total", "clusters")

if TYPE_CHECKING:  # migration imports torch: loaded on first use, so the router and ingress stay light
    from mosaic_ray.runtime.migration import MigrationSource


@ray.remote
class ShardActor(ShardDurability, ShardMigration):
    def __init__(
        self, name: str, engine: dict, shard: dict, migration: dict, durability: dict | None = None,
        runtime_name: str = "mosaic",
    ) -> None:
        self.name = name
        self._spec = ShardSpec(**shard)
        self._mig = MigrationSpec(**migration)
        self._runner = EngineRunner(name)
        self._engine = self._runner.call_blocking(EngineSpec(**engine).build)
        self._fatal: BaseException | None = None
        dur = DurabilitySpec(**(durability or {"enabled": False}))
        self._log = ShardLog(dur, runtime_name, self._spec.decode_threads) if dur.enabled else None
        self._snapshots = self._make_snapshots(dur)  # None: no snapshots (shard_durability.py)
        self._draining = False
        self._meter = ShardMeter(self._spec.rate_window_s, self._spec.ttft_buckets_s)
        self._capacity = CapacityGate(self._spec.max_utilization, self._spec.capacity_window_s)
        self._ingest = IngestQueue(
            self._engine_append, self._meter, self._spec.max_pending_frames, self._spec.max_coalesce_frames,
            self._spec.decode_threads, log=self._log.write if self._log is not None else None,
            max_stream_pending_frames=self._spec.max_stream_pending_frames, queued=True,
        )
        self._slots: dict[str, StreamSlot] = {}
        self._moved: OrderedDict[str, str] = OrderedDict()
        self._outgoing: dict[str, MigrationSource] = {}
        # Streams the engine already holds (an engine that restores state at start) are served.
        for sid in self._runner.call_blocking(self._engine.list_streams):
            self._slots[sid] = StreamSlot(sid, self._spec.rate_window_s)

    async def ready(self) -> str:
        return self.name

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
        self._slots[stream_id] = StreamSlot(stream_id, self._spec.rate_window_s)
        self._moved.pop(stream_id, None)

    async def close_stream(self, stream_id: str) -> None:
        slot = self._slot(stream_id)
        async with slot.admit(self._spec.hold_timeout_s), slot.lock:
            await self._call(self._engine.close_stream, stream_id)
        slot.close()
        self._slots.pop(stream_id, None)
        if self._log is not None:
            if self._snapshots is not None:
                await self._snapshots.settle(stream_id)  # a snapshot still being written
            await self._log.delete(stream_id)

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
        if self._snapshots is not None:
            self._snapshots.note(slot, ack["frames_added"])
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
                    raise await self._engine_failure(exc) from None
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
            healthy=self._fatal is None,
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
        if self._fatal is not None:
            raise EngineFailedError(f"engine broken: {type(self._fatal).__name__}: {self._fatal}")
        try:
            await asyncio.wait_for(self._call(self._engine.stats), self._spec.health_timeout_s)
        except asyncio.TimeoutError:
            raise EngineFailedError(f"engine did not answer within {self._spec.health_timeout_s} s") from None

    # ------------------------------------------------------------------ internals
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

    async def _call(self, fn, *args):
        try:
            return await self._runner.call(fn, *args)
        except EngineError:
            raise
        except Exception as exc:
            raise await self._engine_failure(exc) from None

    async def _engine_append(self, stream_id: str, frames: list[np.ndarray], stamps: list[float]):
        """Frames into the engine; returns, once they are queued on the engine's thread (or, for
        an engine without a step loop, appended), an awaitable of the frames the stream holds when
        they are in (`IngestQueue(queued=True)`: the stream's lock is not held while the step loop ingests
        them). An engine with a step loop queues them in its scheduler (`queue_frames`): the
        frames of every stream queued meanwhile share one vision batch and one forward, the only
        cross-stream batching there is. Other engines get one `append_frames` call per stream's batch."""
        queue = getattr(self._engine, "queue_frames", None)
        if queue is None:
            held = await self._call(self._engine.append_frames, stream_id, frames, stamps)
            return completed(held)
        async def queue_and_wait() -> int:  # on the engine's loop: a bad batch raises at once
            return await queue(stream_id, frames, stamps)

        # queued on the engine's loop now, so the stream's later requests run after it; not
        # waited for here: the stream's lock is not held while the engine finishes its step
        queued = self._runner.await_(queue_and_wait)

        async def ingested() -> int:
            try:
                return await queued
            except EngineError:
                raise
            except Exception as exc:
                raise await self._engine_failure(exc) from None

        return ingested()

    async def _engine_failure(self, exc: BaseException) -> EngineError:
        """The error for a request whose engine call raised `exc` (not an `EngineError`). One
        request's failure is not evidence that the engine is broken: the engine is probed on a
        known-good input (`Engine.probe`), and the shard is marked broken only if that fails too
        (or does not answer within `health_timeout_s`). Otherwise the request fails alone."""
        self._meter.errors_total += 1
        log.warning("shard %s: a request failed in the engine: %s: %s", self.name, type(exc).__name__, exc)
        if self._fatal is None:
            try:
                await asyncio.wait_for(self._runner.call(self._engine.probe), self._spec.health_timeout_s)
            except EngineError:
                pass  # an engine that refuses sanely is not broken
            except BaseException as probe_exc:  # the timeout too: a hung engine is a broken one
                log.error("shard %s: the engine failed its probe after that (%s): broken", self.name,
                          type(probe_exc).__name__)
                self._fatal = exc
        if self._fatal is not None:
            return EngineFailedError("engine failed; this shard is out of service")
        return RequestFailedError("the engine could not process this request; the shard is healthy")


def spawn_shard(config: RuntimeConfig, index: int):
    """The handle of shard `index` of `config`, started if it is not running.

    Shards are detached named actors: they outlive the router that started them (a router restart
    must find them, streams and all) and are found by name from any ingress replica. Stopped by
    `bootstrap.shutdown_runtime`, also when their Serve app is deleted (`serve/lifetime.py`).
    """
    name = config.shard_name(index)
    return ShardActor.options(
        name=name,
        namespace=config.namespace,
        lifetime="detached",
        get_if_exists=True,
        num_gpus=config.shard.num_gpus,
        num_cpus=config.shard.num_cpus,
        max_restarts=config.shard.max_restarts,
    ).remote(
        name,
        config.engine.model_dump(),
        config.shard.model_dump(),
        config.migration.model_dump(),
        config.durability.model_dump(),
        config.name,
    )
