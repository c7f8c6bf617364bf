"""MigrationEndpoint: a shard's end of moving a stream to another shard (router.py drives it).

Held by `ShardActor` (shard.py); the actor's `migration_*` remote methods are one-line
delegations to it. Constructed with what it works on, and nothing else of the actor:

    shard       the shard's name (in messages)
    spec        the `MigrationSpec` (transport timeouts, verification, abandon_after_s)
    engine      the engine; its methods run only through `call`
    call        call(fn, *args): `fn` on the engine thread (`ShardActor._call`)
    streams     the shard's stream -> `StreamSlot` map (a finished move's copy is removed from it)
    lookup      lookup(stream_id) -> its slot, or the error a request gets (`ShardActor._slot`)
    serve       serve(stream_id, last_seq, rates): a received stream is served here from now on
    moved       moved(stream_id, shard): requests for the stream are redirected to `shard`
    log         the shard's `ShardLog`, or None when frame logs are off
    meter       the shard's `ShardMeter` (migrations in and out are counted)

Verbs, in the order a move calls them:

    begin (freeze + export) -> offer -> send | the target's receive -> finish (drop this copy,
    redirect) or abort (thaw); abort_all (a restarted router's reconcile)

A frozen stream holds its new requests; one whose move is neither finished nor aborted (its
router died) is thawed after `MigrationSpec.abandon_after_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import ray

from mosaic_ray.engine.interface import EngineError, StreamExistsError
from mosaic_ray.runtime.config import MigrationSpec
from mosaic_ray.runtime.errors import MigrationError
from mosaic_ray.runtime.durability.shard_log import ShardLog
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.runtime.actors.stream_slot import StreamSlot

if TYPE_CHECKING:  # migration imports torch: loaded on first use, so the router and ingress stay light
    from mosaic_ray.runtime.actors.migration import MigrationSource, TransferOffer


class MigrationEndpoint:
    def __init__(
        self, shard: str, spec: MigrationSpec, engine: Any, call: Callable[..., Awaitable[Any]],
        streams: dict[str, StreamSlot], lookup: Callable[[str], StreamSlot],
        serve: Callable[[str, int, tuple[float, float]], Any], moved: Callable[[str, str], None],
        log: ShardLog | None, meter: ShardMeter,
    ) -> None:
        self._shard = shard
        self._mig = spec
        self._engine = engine
        self._call = call
        self._slots = streams
        self._slot = lookup
        self._serve = serve
        self._moved = moved
        self._log = log
        self._meter = meter
        self._outgoing: dict[str, MigrationSource] = {}

    async def begin(self, stream_id: str) -> dict[str, float]:
        """Freeze the stream (its new requests are held) and export it, ready to be offered.
        Returns seconds spent: freeze (in-flight requests drained), export, fingerprint."""
        from mosaic_ray.runtime.actors.migration import MigrationSource

        slot = self._slot(stream_id)
        t0 = time.perf_counter()
        await slot.freeze()
        t1 = time.perf_counter()
        try:
            if self._log is not None:  # records the engine holds but a failed write left unlogged
                await slot.log_order.flush(lambda records: self._log.write(stream_id, records))
            state = await self._call(self._engine.export_stream, stream_id)
            t2 = time.perf_counter()
            meta = {"engine": state["meta"], "last_seq": slot.last_seq, "rates": slot.rates()}
            source = await asyncio.to_thread(MigrationSource, stream_id, meta, state["tensors"], self._mig.verify)
        except BaseException:
            slot.thaw()
            raise
        self._outgoing[stream_id] = source
        asyncio.get_running_loop().create_task(self._expire(stream_id, source))
        return {"freeze_s": t1 - t0, "export_s": t2 - t1, "source_fingerprint_s": source.stats.fingerprint_s}

    async def offer(self, stream_id: str, transport: str) -> TransferOffer:
        """Offer the frozen stream by `transport` ("distributed" | "object_store")."""
        host = self._mig.rendezvous_host or ray.util.get_node_ip_address()
        async with self._transport_errors(stream_id):
            return self._outgoing[stream_id].offer(transport, host, self._mig.timeout_s)

    async def send(self, stream_id: str) -> dict[str, float]:
        async with self._transport_errors(stream_id):
            stats = await asyncio.to_thread(self._outgoing[stream_id].send, self._mig.timeout_s)
        return {f"send_{k}": v for k, v in stats.as_dict().items() if k != "fingerprint_s"}

    async def receive(self, offer: TransferOffer) -> dict[str, float]:
        """Fetch and install a stream offered by another shard. On failure nothing is installed.
        Returns seconds spent: connect, transfer, fingerprint, import (and bytes by backend)."""
        from mosaic_ray.runtime.actors.migration import receive as fetch

        sid = offer.stream_id
        if sid in self._slots:
            raise StreamExistsError(f"stream {sid!r} exists on {self._shard}")
        async with self._transport_errors(sid):
            tensors, stats = await asyncio.to_thread(fetch, offer, self._mig.verify)
        t0 = time.perf_counter()
        await self._call(self._engine.import_stream, sid, {"meta": offer.meta["engine"], "tensors": tensors})
        timings = {f"receive_{k}": v for k, v in stats.as_dict().items()} | {"import_s": time.perf_counter() - t0}
        self._serve(sid, offer.meta["last_seq"], offer.meta["rates"])
        self._meter.migrations_in += 1
        return timings

    async def finish(self, stream_id: str, moved_to: str) -> None:
        """The stream lives on `moved_to` now: drop this copy, redirect held and later requests."""
        slot = self._slots.get(stream_id)
        if slot is None:
            return
        if not slot.frozen:  # an orphan found by the router's reconcile, not a migration
            await slot.freeze()
        source = self._outgoing.pop(stream_id, None)
        if source is not None:
            source.close()
        await self._call(self._engine.close_stream, stream_id)
        del self._slots[stream_id]
        if self._log is not None:
            await self._log.release(stream_id)  # the target appends to the same log now
        slot.release(moved_to)
        self._moved(stream_id, moved_to)
        self._meter.migrations_out += 1

    async def abort(self, stream_id: str) -> None:
        """The move failed: serve the stream here again, as it was."""
        source = self._outgoing.pop(stream_id, None)
        if source is not None:
            source.close()
        slot = self._slots.get(stream_id)
        if slot is not None:
            slot.thaw()

    async def abort_all(self) -> list[str]:
        """Abort every outgoing move (a restarted router's reconcile); returns the streams thawed."""
        streams = list(self._outgoing)
        for sid in streams:
            await self.abort(sid)
        return streams

    async def _expire(self, stream_id: str, source: MigrationSource) -> None:
        """Thaw a stream whose migration was neither finished nor aborted (its router died)."""
        await asyncio.sleep(self._mig.abandon_after_s)
        if self._outgoing.get(stream_id) is source:
            await self.abort(stream_id)

    @asynccontextmanager
    async def _transport_errors(self, stream_id: str) -> AsyncIterator[None]:
        """torch.distributed / object-store failures cross Ray as `MigrationError` (an EngineError)."""
        try:
            yield
        except EngineError:
            raise
        except KeyError:
            raise MigrationError(f"stream {stream_id!r} is not being moved from {self._shard}") from None
        except Exception as exc:
            raise MigrationError(f"{type(exc).__name__}: {exc}") from None
