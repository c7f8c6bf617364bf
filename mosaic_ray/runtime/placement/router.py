"""Router: where streams live. Places new streams, keeps the map, rebalances by moving streams.

A detached named Ray actor (`<name>:router`, restarted by Ray if it dies). It owns the
stream->shard map (`StreamMap`, written through to Ray's KV store or a JSON file before anything
acts on it) and starts the shard actors by name, so a restarted router re-reads the map, re-finds
the same shards and loses nothing. On (re)start it reconciles the map with what shards actually
hold: a stream a shard holds but the map does not name is adopted; a second copy (a migration cut
off by the crash) is dropped.

Placement: a new stream goes to the healthy shard with the lowest load score (`load.py`).
Rebalancing: when the heaviest shard's score passes `skew_ratio` x the lightest's, whole streams
move from heavy to light (`plan_moves`), one by one, each by `_move`:

    source.migration_begin   freeze the stream (its requests are held), export
    source.migration_offer   by torch.distributed; under "auto", by Ray's object store if that fails
    target.migration_receive fetch, verify, import
    map.set(stream, target)  the move is now the truth
    source.migration_finish  drop the source copy; held requests are redirected to the target

Any failure before `map.set` aborts: the target drops what it got, the source thaws and serves the
stream as before. Operations on one stream (create, delete, move) are serialized by a per-stream
lock; `locate` takes no lock (a stale answer is corrected by the shard's redirect).

A shard that dies has its streams rebuilt elsewhere from their frame logs (`RecoveryManager`,
recovery.py); meanwhile `locate` answers 503 + Retry-After for them.

Collaborators, each constructed with what it needs (never the router itself): `StreamMap` (the
map), `ShardPool` (shard_pool.py: the shards' handles, health, reservations and load reports) and
`RecoveryManager` (given the map, the pool, the frame log and the per-stream lock). The remote
methods that are the recovery's (`recovery_status`, `shard_failed`, `drain`) are one-line
delegations.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import ray

# Stream ids are safe in a URL path segment, a metric label, a KV key and a file name: one grammar
# (`mosaic_ray.bounds`), matched as a whole string.
from mosaic_ray.bounds import STREAM_ID_PATTERN, is_stream_id
from mosaic_ray.engine.interface import EngineError, InvalidInputError, StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import (
    MigrationError,
    QuotaExceededError,
    ShardBusyError,
    ShardUnavailableError,
    unwrap_ray_error,
)
from mosaic_ray.runtime.durability.frame_log_stores import open_frame_log
from mosaic_ray.runtime.actors.load import LoadReport, plan_moves
from mosaic_ray.runtime.placement.recovery import RecoveryManager
from mosaic_ray.runtime.placement.shard_pool import ShardPool
from mosaic_ray.runtime.placement.stream_map import StreamMap, open_store

log = logging.getLogger("mosaic_ray.runtime.placement.router")


def new_stream_id() -> str:
    return f"s-{uuid.uuid4().hex[:16]}"


def held_prefixed(streams: StreamMap, recovering: Iterable[str], prefix: str) -> int:
    """Streams under `prefix` that exist: mapped, or known from their logs only (being rebuilt
    after a restart, or quarantined: `recovering`). `ready()` registers the latter before any create."""
    unmapped = sum(1 for sid in recovering if sid.startswith(prefix) and sid not in streams)
    return streams.count_prefixed(prefix) + unmapped


class Router:
    def __init__(self, config: dict[str, Any]) -> None:
        self._cfg = RuntimeConfig(**config)
        self._map = StreamMap(open_store(self._cfg.router.state_store, self._cfg.name, self._cfg.namespace))
        self._locks: dict[str, list] = {}  # stream -> [lock, holders and waiters]
        self._rebalancing = asyncio.Lock()
        self._shards = ShardPool(self._cfg, self._map.count_by_shard,
                                 on_death=lambda shard, reason: self._recovery.shard_died(shard, reason))
        dur = self._cfg.durability
        self._recovery = RecoveryManager(self._cfg, open_frame_log(dur, self._cfg.name) if dur.enabled else None,
                                         self._map, self._shards, self._lock)
        # Start (wait for shards, reconcile, start the loops) without waiting for a caller: after
        # Ray restarts the router, nobody may call `ready` for a long time.
        try:
            self._starting: asyncio.Task | None = asyncio.get_running_loop().create_task(self._start())
        except RuntimeError:  # no running loop in __init__: the first `ready` starts it
            self._starting = None

    async def ready(self) -> list[str]:
        """Wait until every shard answers and the map is reconciled; returns the shard names."""
        if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
            self._starting = asyncio.get_running_loop().create_task(self._start())  # first, or retry
        await asyncio.shield(self._starting)
        return self._shards.names()

    async def _start(self) -> None:
        spec = self._cfg.shard
        try:
            handles = [self._shards.handle(n) for n in self._shards.names()]
            await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in handles)), spec.start_timeout_s)
        except asyncio.TimeoutError:
            raise ShardUnavailableError(
                f"shards not ready after {spec.start_timeout_s:.0f} s: each needs num_gpus={spec.num_gpus}, "
                f"num_cpus={spec.num_cpus} free on the cluster (see `ray status`)"
            ) from None
        await self._recovery.recover_orphans(await self._reconcile())
        loop = asyncio.get_running_loop()
        if self._cfg.router.health_interval_s > 0:
            loop.create_task(self._every(self._cfg.router.health_interval_s, self.health))
        if self._cfg.router.rebalance_interval_s > 0:
            loop.create_task(self._every(self._cfg.router.rebalance_interval_s, self.rebalance))

    # ------------------------------------------------------------------ the map
    async def create_stream(
        self, stream_id: str | None = None, shard: str | None = None,
        quota: tuple[str, int, float] | None = None,
    ) -> dict[str, str]:
        """Open a stream on `shard`, or on the least-loaded healthy shard; returns {"id", "shard"}.

        `quota` (prefix, n, retry_after_s): refuse (`QuotaExceededError`, 429) when n streams whose
        ids start with prefix exist (a tenant's streams, `serve/auth.py`), those still being
        rebuilt from their logs (after a restart) or quarantined included. Creations under one
        prefix are serialized, so concurrent ones never overshoot n.
        """
        sid = stream_id or new_stream_id()
        if not is_stream_id(sid):
            raise InvalidInputError(f"stream id must match {STREAM_ID_PATTERN}, got {sid!r}")
        if shard is not None and shard not in self._shards:
            raise InvalidInputError(f"unknown shard {shard!r}")
        await self.ready()  # after a restart, no change before the map is reconciled
        self._recovery.refuse_if_draining()
        # "/" is in no stream id: a quota's lock never is a stream's. Always taken before the
        # stream's lock, and only here, so the two never deadlock.
        async with self._lock(f"quota/{quota[0]}") if quota else nullcontext(), self._lock(sid):
            if sid in self._map or self._recovery.is_recovering(sid):  # a logged stream being rebuilt exists too
                raise StreamExistsError(f"stream {sid!r} exists")
            if quota is not None and self._held_prefixed(quota[0]) >= quota[1]:
                raise QuotaExceededError(f"at most {quota[1]} streams may be held at once", quota[2])
            # a shard at its measured capacity refuses (ShardBusyError): the next least loaded is tried
            candidates = [shard] if shard is not None else await self._shards.by_load()
            for i, target in enumerate(candidates):
                try:
                    with self._shards.reserve(target):
                        await self._on(target, "open_stream", sid)
                    break
                except ShardBusyError:
                    if i == len(candidates) - 1:
                        raise
            self._map.set(sid, target)
        return {"id": sid, "shard": target}

    def _held_prefixed(self, prefix: str) -> int:
        return held_prefixed(self._map, self._recovery.recovering_ids(), prefix)

    async def delete_stream(self, stream_id: str) -> None:
        await self.ready()
        async with self._lock(stream_id):
            if await self._recovery.forget(stream_id):
                return
            owner = self.locate(stream_id)
            try:
                await self._on(owner, "close_stream", stream_id)
            except UnknownStreamError:
                pass  # already gone from the shard; the map entry is what is left
            self._map.delete(stream_id)

    def locate(self, stream_id: str) -> str:
        self._recovery.refuse_if_recovering(stream_id)
        owner = self._map.get(stream_id)
        if owner is None:
            raise UnknownStreamError(f"stream {stream_id!r} not found")
        return owner

    def list_streams(self) -> dict[str, str]:
        return dict(self._map.items())

    def shards(self) -> dict[str, bool]:
        """Shard name -> healthy (as of the last probe)."""
        return self._shards.healthy()

    # ------------------------------------------------------------------ recovery (recovery.py)
    def recovery_status(self) -> dict[str, Any]:
        return self._recovery.recovery_status()

    async def shard_failed(self, shard: str) -> bool:
        return await self._recovery.shard_failed(shard)

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        return await self._recovery.drain(timeout_s)

    # ------------------------------------------------------------------ load and health
    async def loads(self) -> list[LoadReport]:
        return list((await self._shards.fresh_reports(max_age_s=0.0)).values())

    async def health(self) -> dict[str, str]:
        """Probe every shard: name -> "ok" or the reason it is unhealthy."""
        names = [n for n in self._shards.names() if not self._recovery.is_dead(n)]  # the dead are being replaced
        results = await asyncio.gather(
            *(self._shards.handle(n).check_health.remote() for n in names), return_exceptions=True
        )
        for name, res in zip(names, results):
            if isinstance(res, ray.exceptions.ActorDiedError):
                self._recovery.shard_died(name, str(res))
            elif isinstance(res, BaseException):
                self._shards.mark_unhealthy(name, str(unwrap_ray_error(res)))
                self._recovery.shard_broken(name, unwrap_ray_error(res))
            else:
                self._shards.mark_healthy(name)
        self._recovery.retry()  # streams whose rebuild failed are tried again
        return {n: self._shards.reason(n) for n in self._shards.names()}

    # ------------------------------------------------------------------ rebalancing
    async def migrate(self, stream_id: str, target: str, transport: str | None = None) -> dict[str, str]:
        """Move one stream to `target` (all of it: a stream never spans shards). `transport`
        overrides the configured one ("auto" | "distributed" | "object_store")."""
        if target not in self._shards:
            raise InvalidInputError(f"unknown shard {target!r}")
        await self.ready()
        async with self._lock(stream_id):
            source = self.locate(stream_id)
            phases: dict[str, float] = {}
            used = await self._move(stream_id, source, target, transport, phases) if source != target else "none"
        return {"id": stream_id, "source": source, "target": target, "transport": used, "phases": phases}

    async def rebalance(self) -> list[dict[str, str]]:
        """One rebalancing round; returns the moves made."""
        await self.ready()
        async with self._rebalancing:
            reports = await self._shards.fresh_reports(max_age_s=0.0)
            names = sorted(reports)
            per_shard = await asyncio.gather(*(self._shards.handle(n).stream_loads.remote() for n in names))
            w = self._cfg.router.weights
            moves = plan_moves(
                {n: reports[n].score(w) for n in names},
                dict(zip(names, per_shard)),
                w,
                self._cfg.router.skew_ratio,
                self._cfg.router.min_score,
                self._cfg.router.max_migrations_per_round,
            )
            done = []
            for m in moves:
                try:
                    done.append(await self.migrate(m.stream_id, m.target))
                except EngineError as exc:  # moved, deleted or busy meanwhile; next round sees afresh
                    log.warning("rebalance: moving %s stopped: %s", m.stream_id, exc)
                    break
            self._shards.stale()
            return done

    async def _move(self, sid: str, source: str, target: str, transport: str | None,
                    phases: dict[str, float]) -> str:
        """Move `sid`; returns the transport that carried it. `phases` gets the seconds (and bytes)
        of each step, as the two shards measured them, and `total_s` as seen here."""
        t_start = time.perf_counter()
        transport = transport or self._cfg.migration.transport
        kinds = {"auto": ["distributed", "object_store"], "distributed": ["distributed"],
                 "object_store": ["object_store"]}.get(transport)
        if kinds is None:
            raise InvalidInputError(f"unknown transport {transport!r}")
        phases.update(await self._on(source, "migration_begin", sid) or {})
        try:
            for i, kind in enumerate(kinds):
                try:
                    offer = await self._on(source, "migration_offer", sid, kind)
                    t0 = time.perf_counter()
                    phases.update(await self._transfer(sid, source, target, offer))
                    phases["transfer_and_import_s"] = time.perf_counter() - t0
                    break
                except Exception as exc:
                    if i + 1 == len(kinds):
                        raise
                    log.warning("moving %s by %s failed (%s); trying %s", sid, kind, exc, kinds[i + 1])
                    await self._on(target, "migration_finish", sid, source)  # drop any partial copy
            self._map.set(sid, target)
        except BaseException as exc:
            # Undo in this order, each step whatever became of the other: the target's copy first
            # (so a stream is never served by two shards), then the source serves again.
            await self._quietly(self._on(target, "migration_finish", sid, source))
            await self._quietly(self._on(source, "migration_abort", sid))
            if isinstance(exc, Exception):
                raise MigrationError(f"moving {sid!r} from {source} to {target} failed: {exc}") from None
            raise
        await self._on(source, "migration_finish", sid, target)
        phases["total_s"] = time.perf_counter() - t_start
        return kind

    async def _transfer(self, sid: str, source: str, target: str, offer: Any) -> dict[str, float]:
        if offer.transport == "distributed":
            sent, got = await asyncio.gather(self._on(source, "migration_send", sid),
                                             self._on(target, "migration_receive", offer))
            return {**(sent or {}), **(got or {})}
        return await self._on(target, "migration_receive", offer) or {}

    # ------------------------------------------------------------------ internals
    @asynccontextmanager
    async def _lock(self, stream_id: str) -> AsyncIterator[None]:
        """Serialize changes to one stream. Entries live only while someone holds or awaits them."""
        entry = self._locks.setdefault(stream_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[stream_id]

    async def _on(self, shard: str, method: str, *args: Any) -> Any:
        return await self._shards.call(shard, method, *args)

    @staticmethod
    async def _quietly(step) -> None:
        try:
            await step
        except Exception as exc:
            log.warning("cleanup step failed: %s", exc)

    async def _reconcile(self) -> set[str]:
        """Make the map agree with what shards hold (after a crash between two steps of a change).
        Returns the streams live shards hold."""
        names = self._shards.names()
        held = await asyncio.gather(*(self._shards.handle(n).list_streams.remote() for n in names),
                                    return_exceptions=True)
        holders: dict[str, list[str]] = {}
        for name, streams in zip(names, held):
            if isinstance(streams, BaseException):
                self._shards.mark_unhealthy(name, str(unwrap_ray_error(streams)))
                continue
            for sid in streams:
                holders.setdefault(sid, []).append(name)
        for sid, shards in sorted(holders.items()):
            owner = self._map.get(sid)
            if owner not in shards:
                owner = shards[0]
                log.warning("reconcile: stream %s is on %s; the map said %s", sid, owner, self._map.get(sid))
                self._map.set(sid, owner)
            for extra in shards:
                if extra != owner:
                    log.warning("reconcile: dropping the stale copy of %s on %s", sid, extra)
                    await self._quietly(self._on(extra, "migration_finish", sid, owner))
        # Moves the previous router left half-done: their sources serve again (no router moves
        # anything before this returns, so none of these is a live move).
        live = [n for n, ok in self._shards.healthy().items() if ok]
        await asyncio.gather(*(self._quietly(self._on(n, "migration_abort_all")) for n in live))
        return set(holders)

    async def _every(self, interval_s: float, job) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception:
                log.exception("router background job %s failed", job.__name__)
