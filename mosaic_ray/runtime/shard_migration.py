"""ShardMigration: a shard's verbs for moving a stream to another shard (router.py drives them).

A mixin of `ShardActor` (shard.py), kept apart so each file holds one concept, like
`ShardDurability`. It uses the actor's `_slots`, `_moved`, `_outgoing`, `_mig`, `_spec`, `_log`,
`_meter`, `_engine`, `_call`, `_slot`, `_log_writer` and `name`.

    migration_begin (freeze + export) -> migration_offer -> migration_send | the target's
    migration_receive -> migration_finish (drop this copy, redirect) or migration_abort (thaw)

A frozen stream holds its new requests; one whose move is neither finished nor aborted (its
router died) is thawed after `MigrationSpec.abandon_after_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import ray

from mosaic_ray.engine.interface import EngineError, StreamExistsError
from mosaic_ray.runtime.errors import MigrationError
from mosaic_ray.runtime.stream_slot import StreamSlot

if TYPE_CHECKING:  # migration imports torch: loaded on first use, so the router and ingress stay light
    from mosaic_ray.runtime.migration import MigrationSource, TransferOffer


class ShardMigration:
    async def migration_begin(self, stream_id: str) -> dict[str, float]:
        """Freeze the stream (its new requests are held) and export it, ready to be offered.
        Returns seconds spent: freeze (in-flight requests drained), export, fingerprint."""
        from mosaic_ray.runtime.migration import MigrationSource

        slot = self._slot(stream_id)
        t0 = time.perf_counter()
        await slot.freeze()
        t1 = time.perf_counter()
        try:
            if self._log is not None:  # records the engine holds but a failed write left unlogged
                await slot.log_order.flush(self._log_writer(stream_id))
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

    async def migration_offer(self, stream_id: str, transport: str) -> TransferOffer:
        """Offer the frozen stream by `transport` ("distributed" | "object_store")."""
        host = self._mig.rendezvous_host or ray.util.get_node_ip_address()
        async with self._transport_errors(stream_id):
            return self._outgoing[stream_id].offer(transport, host, self._mig.timeout_s)

    async def migration_send(self, stream_id: str) -> dict[str, float]:
        async with self._transport_errors(stream_id):
            stats = await asyncio.to_thread(self._outgoing[stream_id].send, self._mig.timeout_s)
        return {f"send_{k}": v for k, v in stats.as_dict().items() if k != "fingerprint_s"}

    async def migration_receive(self, offer: TransferOffer) -> dict[str, float]:
        """Fetch and install a stream offered by another shard. On failure nothing is installed.
        Returns seconds spent: connect, transfer, fingerprint, import (and bytes by backend)."""
        from mosaic_ray.runtime.migration import receive

        sid = offer.stream_id
        if sid in self._slots:
            raise StreamExistsError(f"stream {sid!r} exists on {self.name}")
        async with self._transport_errors(sid):
            tensors, stats = await asyncio.to_thread(receive, offer, self._mig.verify)
        t0 = time.perf_counter()
        await self._call(self._engine.import_stream, sid, {"meta": offer.meta["engine"], "tensors": tensors})
        timings = {f"receive_{k}": v for k, v in stats.as_dict().items()} | {"import_s": time.perf_counter() - t0}
        self._slots[sid] = StreamSlot(sid, self._spec.rate_window_s, offer.meta["last_seq"], offer.meta["rates"])
        self._moved.pop(sid, None)
        self._meter.migrations_in += 1
        return timings

    async def migration_finish(self, stream_id: str, moved_to: str) -> None:
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
        self._remember_moved(stream_id, moved_to)
        self._meter.migrations_out += 1

    async def migration_abort(self, stream_id: str) -> None:
        """The move failed: serve the stream here again, as it was."""
        source = self._outgoing.pop(stream_id, None)
        if source is not None:
            source.close()
        slot = self._slots.get(stream_id)
        if slot is not None:
            slot.thaw()

    async def migration_abort_all(self) -> list[str]:
        """Abort every outgoing move (a restarted router's reconcile); returns the streams thawed."""
        streams = list(self._outgoing)
        for sid in streams:
            await self.migration_abort(sid)
        return streams

    async def _expire(self, stream_id: str, source: MigrationSource) -> None:
        """Thaw a stream whose migration was neither finished nor aborted (its router died)."""
        await asyncio.sleep(self._mig.abandon_after_s)
        if self._outgoing.get(stream_id) is source:
            await self.migration_abort(stream_id)

    @asynccontextmanager
    async def _transport_errors(self, stream_id: str) -> AsyncIterator[None]:
        """torch.distributed / object-store failures cross Ray as `MigrationError` (an EngineError)."""
        try:
            yield
        except EngineError:
            raise
        except KeyError:
            raise MigrationError(f"stream {stream_id!r} is not being moved from {self.name}") from None
        except Exception as exc:
            raise MigrationError(f"{type(exc).__name__}: {exc}") from None

    def _remember_moved(self, stream_id: str, shard: str) -> None:
        self._moved[stream_id] = shard
        self._moved.move_to_end(stream_id)
        while len(self._moved) > self._spec.moved_memory:
            self._moved.popitem(last=False)
