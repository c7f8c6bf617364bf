"""RecoveryManager: the router's half of durability. A dead shard's streams are rebuilt on live
shards from their frame logs; a restarted runtime rebuilds the streams its logs hold.

Held by `Router` (router.py); the router's `recovery_status`, `shard_failed` and `drain` are
one-line delegations to it, and it asks it, before placing or answering for a stream, whether the
stream is being rebuilt (`refuse_if_recovering`, `is_recovering`). It owns the recovery state: the
dead shards, the streams being rebuilt (and from where), their errors, the quarantined ones, the
episodes, the draining flag. Constructed with what it works on, and nothing else of the router:

    cfg         the `RuntimeConfig` (durability and shard settings, shard names)
    frame_log   the runtime's `FrameLog` (listing and deleting stream logs), None when logs are off
    streams     the stream -> shard map (`StreamMap`: `items`, `set`, `delete`)
    shards      the router's shards, `RecoveryShards` below (a `ShardPool`, shard_pool.py)
    lock        lock(stream_id): the async context manager that serializes changes to one stream

Verbs: `recovery_status()`, `refuse_if_recovering(sid)`, `refuse_if_draining()`,
`is_recovering(sid)`, `recovering_ids()`, `is_dead(shard)`; `shard_failed(shard)` (an ingress
saw it die), `shard_died(shard, reason)` (a call or probe did), `shard_broken(shard, cause)`
(its health probe raised); `retry()` (streams whose rebuild failed are tried again),
`recover_orphans(held)` (at start), `forget(sid)` (a recovering stream was deleted); `drain(timeout_s)`.

When a shard is found dead (a call or a health probe raises `ActorDiedError`, or an ingress
replica reports one through `shard_failed`; with `DurabilitySpec.replace_broken_shards`, also a
shard whose health probe says its engine is broken or hung, which is then killed):

1. it is marked dead: nothing is placed there, and every stream the map gives it is
   *recovering*: `locate` answers `StreamRecoveringError` (HTTP 503 + Retry-After) meanwhile;
2. a replacement actor of the same name is started in the background (capacity comes back);
3. each stream, `replay_parallel_streams` at a time and at most `replay_streams_per_shard` on one
   shard: the least-loaded live shard with room (the replacement once it has started: it is
   empty) replays the stream's log (`ShardActor.recover_stream`), then `map.set(stream, shard)`;
   its requests flow again. A stream that finds every live shard full waits for a rebuild to end
   or a replacement to start.

A stream whose rebuild failed (its target died too, its log is unreadable) stays recovering and
is tried again after a backoff (RETRY_MIN_S doubling to RETRY_MAX_S), or sooner on a health round
or report. A stream with no log (logs off) is gone: its map entry is dropped (404 from then on). A
stream whose log holds a poison record (one that fails validation, or that the engine fails on
while passing its probe: `StreamQuarantinedError` from the replay; the target stays healthy), or
whose replay broke the target's engine, is quarantined: never tried again (else it could break
every shard in turn), answered 500 `stream_quarantined` until deleted. So is a stream whose log
was compacted and whose snapshot is unusable (`SnapshotLostError`, `snapshots.py`): its start is
lost, and it is not served truncated.
At start, after the reconcile, a stream that has a log but that no live shard holds (a restart of
the whole runtime, or a shard that died while no router ran) is recovered the same way.

Invariant: a stream is served by at most one shard. The dead shard serves nothing; a stream is
mapped to its new shard only after that shard holds every record of its log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager, suppress
from typing import Any, Protocol

import ray
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay, wait_fixed

from mosaic_ray.engine.interface import StreamExistsError, UnknownStreamError
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import (
    EngineFailedError,
    ShardUnavailableError,
    SnapshotLostError,
    ShuttingDownError,
    StreamQuarantinedError,
    StreamRecoveringError,
)
from mosaic_ray.runtime.durability.frame_log import FrameLog
from mosaic_ray.runtime.placement.stream_map import StreamMap

log = logging.getLogger("mosaic_ray.runtime.placement.recovery")

# Seconds between attempts to start a replacement shard. The first attempt often finds the dead
# actor's name not yet released (a name lookup: cheap to repeat), so retry soon.
REPLACE_RETRY_S = 0.5
# Backoff between passes over streams whose rebuild failed: soon (a target that died mid-replay is
# replaced in seconds), then rarer (a corrupt log fails every time; each try reads it whole).
RETRY_MIN_S = 0.5
RETRY_MAX_S = 30.0
# Streams of one episode whose rebuild figures `recovery_status` lists (a bound on its size).
EPISODE_REBUILDS = 64
# A stream waiting for room on a shard looks again at least this often (a rebuild's end and a
# replacement's start wake it at once).
ROOM_POLL_S = 0.5


class RecoveryShards(Protocol):
    """What recovery needs of the router's shards (`ShardPool` has it; tests fake it)."""

    def names(self) -> list[str]: ...
    def handle(self, shard: str) -> Any | None: ...  # its `ready` / `drain` remote methods are called
    async def call(self, shard: str, method: str, *args: Any) -> Any: ...  # "recover_stream" here
    async def by_load(self) -> list[str]: ...  # healthy, least loaded first; ShardUnavailableError: none
    def reserve(self, shard: str) -> AbstractContextManager[None]: ...
    def mark_unhealthy(self, shard: str, reason: str) -> None: ...
    def stale(self) -> None: ...  # load reports asked afresh
    def spawn(self, shard: str) -> Any: ...  # a fresh actor under a dead one's name
    def kill(self, shard: str) -> None: ...
    def install(self, shard: str, handle: Any) -> None: ...  # the replacement serves, healthy


class RecoveryManager:
    def __init__(self, cfg: RuntimeConfig, frame_log: FrameLog | None, streams: StreamMap,
                 shards: RecoveryShards, lock: Callable[[str], AbstractAsyncContextManager[None]]) -> None:
        self._cfg = cfg
        self._log = frame_log
        self._map = streams
        self._shards = shards
        self._lock = lock
        self._dead: set[str] = set()
        self._recovering: dict[str, str] = {}  # stream -> the shard it is recovered from ("log": a restart)
        self._recovery_errors: dict[str, str] = {}
        self._quarantined: set[str] = set()  # recovering streams whose replay broke an engine
        self._recovery_task: asyncio.Task | None = None
        self._retry_s = RETRY_MIN_S
        self._failed_attempts = 0  # rebuilds that failed and were (or will be) tried again
        self._episodes: list[dict[str, Any]] = []  # one per dead shard or restart: timings, counts
        self._draining = False
        self._rebuilding: Counter[str] = Counter()  # shard -> rebuilds running there
        self._room = asyncio.Event()  # set when a rebuild ends or a replacement starts

    # ------------------------------------------------------------------ queries
    def recovery_status(self) -> dict[str, Any]:
        return {"dead": sorted(self._dead), "recovering": dict(self._recovering),
                "errors": dict(self._recovery_errors), "quarantined": sorted(self._quarantined),
                "failed_attempts": self._failed_attempts,
                "episodes": list(self._episodes)}

    def is_recovering(self, stream_id: str) -> bool:
        """Being rebuilt, or quarantined: the stream exists, though no shard serves it."""
        return stream_id in self._recovering

    def recovering_ids(self) -> list[str]:
        return list(self._recovering)

    def is_dead(self, shard: str) -> bool:
        """Dead and being replaced: not probed, nothing placed there."""
        return shard in self._dead

    def refuse_if_recovering(self, stream_id: str) -> None:
        if stream_id in self._quarantined:
            raise StreamQuarantinedError(f"stream {stream_id!r} is quarantined: it could not be rebuilt from its "
                                         f"log ({self._recovery_errors.get(stream_id, '')}); delete it")
        if stream_id in self._recovering:
            raise StreamRecoveringError(
                f"stream {stream_id!r} is being rebuilt from its frame log (its shard died); retry",
                self._cfg.durability.recovering_retry_after_s,
            )

    def refuse_if_draining(self) -> None:
        if self._draining:
            raise ShuttingDownError("the runtime is shutting down")

    # ------------------------------------------------------------------ detection
    async def shard_failed(self, shard: str) -> bool:
        """An ingress saw `shard` die: check, and recover its streams if so. True when dead."""
        if shard in self._dead:
            self.retry()
            return True
        handle = self._shards.handle(shard)
        if handle is None:
            return False
        try:
            await asyncio.wait_for(handle.ready.remote(), self._cfg.shard.health_timeout_s)
        except ray.exceptions.ActorDiedError as exc:
            self.shard_died(shard, str(exc))
            return True
        except Exception:
            return False
        return False

    def shard_broken(self, shard: str, cause: BaseException) -> None:
        """The shard's health probe raised `cause`. With `replace_broken_shards`: a shard whose
        engine is broken or hung (a lost GPU, a CUDA error) is killed, then recovered from like a
        dead one."""
        if not (self._cfg.durability.replace_broken_shards and isinstance(cause, EngineFailedError)):
            return
        log.warning("shard %s: %s; replacing it", shard, cause)
        self._shards.kill(shard)
        self.shard_died(shard, f"engine broken: {cause}")

    def shard_died(self, shard: str, reason: str) -> None:
        """`shard`'s actor is dead: its streams are recovering, a replacement is started."""
        if shard in self._dead:
            return
        self._dead.add(shard)
        self._shards.mark_unhealthy(shard, f"dead, being replaced: {reason.splitlines()[0] if reason else ''}")
        streams = [sid for sid, owner in self._map.items() if owner == shard]
        log.warning("shard %s died; recovering its %d stream(s) from their logs", shard, len(streams))
        if self._log is not None:
            for sid in streams:
                self._recovering.setdefault(sid, shard)
            self._episodes.append({"from": shard, "streams": len(streams), "started": time.time(),
                                   "seconds": None, "frames": 0})
        asyncio.get_running_loop().create_task(self._replace_shard(shard))
        self.retry()

    async def _replace_shard(self, name: str) -> None:
        """A fresh actor under the dead one's name (same resources, empty)."""
        self._shards.kill(name)

        async def start() -> Any:
            handle = self._shards.spawn(name)
            await asyncio.wait_for(handle.ready.remote(), self._cfg.shard.start_timeout_s)
            return handle

        def retrying(state: RetryCallState) -> None:  # the dead actor's name not yet released, or no resources
            log.warning("replacement for %s not ready (%s); trying again", name, type(state.outcome.exception()).__name__)

        # tenacity: every REPLACE_RETRY_S, until it starts (on any Exception)
        handle = await AsyncRetrying(wait=wait_fixed(REPLACE_RETRY_S), before_sleep=retrying)(start)
        self._shards.install(name, handle)
        self._dead.discard(name)
        self._room.set()  # streams waiting for room: the replacement has it
        log.warning("shard %s replaced", name)

    # ------------------------------------------------------------------ rebuilding
    def retry(self) -> None:
        """Rebuild the recovering streams not quarantined, unless a pass is running already."""
        pending = len(self._recovering) > len(self._quarantined)
        if pending and (self._recovery_task is None or self._recovery_task.done()):
            self._recovery_task = asyncio.get_running_loop().create_task(self._recover_all())

    async def _recover_all(self) -> None:
        gate = asyncio.Semaphore(self._cfg.durability.replay_parallel_streams)
        tried: set[str] = set()
        while True:
            todo = [sid for sid in self._recovering if sid not in tried and sid not in self._quarantined]
            if not todo:
                break
            tried.update(todo)
            await asyncio.gather(*(self._recover_one(sid, gate) for sid in todo))
        if len(self._recovering) > len(self._quarantined):  # some failed: another pass, later
            asyncio.get_running_loop().call_later(self._retry_s, self.retry)
            self._retry_s = min(RETRY_MAX_S, 2 * self._retry_s)
            return
        self._retry_s = RETRY_MIN_S
        for ep in self._episodes:
            if ep["seconds"] is None:
                ep["seconds"] = time.time() - ep["started"]

    async def _recover_one(self, sid: str, gate: asyncio.Semaphore) -> None:
        queued = time.time()
        async with gate, self._lock(sid):
            if sid not in self._recovering:
                return  # deleted meanwhile
            try:
                target = await self._recovery_target()
            except ShardUnavailableError as exc:
                self._recovery_errors[sid] = str(exc)
                self._failed_attempts += 1
                return
            self._rebuilding[target] += 1  # no await since the target was chosen: its room is taken
            try:
                with self._shards.reserve(target):
                    info = await self._rebuild_on(target, sid)
            finally:
                self._rebuilding[target] -= 1
                self._room.set()
            if info is None:
                return
            self._map.set(sid, target)
            self._recovering.pop(sid, None)
            self._recovery_errors.pop(sid, None)
            if self._episodes:
                self._note_rebuild(self._episodes[-1], sid, target, queued, info)

    async def _rebuild_on(self, target: str, sid: str) -> dict[str, Any] | None:
        """`target` replays `sid`'s log: its figures, or None when it failed (and what became of
        the stream is recorded: tried again, lost or quarantined)."""
        try:
            return await self._shards.call(target, "recover_stream", sid)
        except StreamExistsError:
            return {"frames": 0}  # the target holds it already (an earlier try got that far)
        except UnknownStreamError:
            log.error("stream %s has no frame log: it is lost", sid)
            self._recovering.pop(sid, None)
            self._map.delete(sid)
        except EngineFailedError as exc:
            log.error("rebuilding %s broke the engine of %s (%s): quarantined", sid, target, exc)
            self._quarantine(sid, f"replay broke the engine of {target}: {exc}")
        except StreamQuarantinedError as exc:  # a poison record; the target is fine
            log.error("stream %s: its log cannot be replayed (%s): quarantined", sid, exc)
            self._quarantine(sid, str(exc))
        except SnapshotLostError as exc:
            log.error("stream %s lost its start (%s): quarantined", sid, exc)
            self._quarantine(sid, str(exc))
        except Exception as exc:
            log.warning("rebuilding %s on %s failed: %s", sid, target, exc)
            self._recovery_errors[sid] = f"{type(exc).__name__}: {exc}"
            self._failed_attempts += 1
        return None

    @staticmethod
    def _note_rebuild(episode: dict[str, Any], sid: str, target: str, queued: float, info: dict[str, Any]) -> None:
        """A rebuilt stream's figures into its episode: frames replayed, and (the first
        `EPISODE_REBUILDS` streams) where its time went: waiting for a turn, then the target's
        read / import / replay (`StreamDurability.rebuild`)."""
        episode["frames"] += int(info.get("frames", 0))
        rebuilds = episode.setdefault("rebuilds", [])
        if len(rebuilds) < EPISODE_REBUILDS:
            now = time.time()
            seconds = float(info.get("seconds", 0.0))
            rebuilds.append({"id": sid, "target": target, "done_s": round(now - episode["started"], 3),
                             "waited_s": round(max(0.0, now - queued - seconds), 3),
                             **{k: round(float(info[k]), 3) for k in ("seconds", "read_s", "import_s", "replay_s")
                                if k in info},
                             "frames": int(info.get("frames", 0)),
                             "snapshot_bytes": int(info.get("snapshot_bytes", 0))})

    def _quarantine(self, sid: str, why: str) -> None:
        self._quarantined.add(sid)
        self._recovery_errors[sid] = why

    async def _recovery_target(self) -> str:
        """The least-loaded live shard with room for one more rebuild (`replay_streams_per_shard`).
        While every live shard is full, waits for a rebuild to end or a replacement to start (then
        asks for fresh load reports); while none lives, asks again every 0.2 s (tenacity), up to the
        shard start timeout, then raises `ShardUnavailableError`."""
        cap = self._cfg.durability.replay_streams_per_shard

        def refresh(_state: RetryCallState) -> None:
            self._shards.stale()

        live = AsyncRetrying(stop=stop_after_delay(self._cfg.shard.start_timeout_s), wait=wait_fixed(0.2),
                             retry=retry_if_exception_type(ShardUnavailableError), before_sleep=refresh, reraise=True)
        while True:
            self._room.clear()  # before looking: a rebuild that ends from here on wakes the wait below
            room = [n for n in await live(self._shards.by_load) if self._rebuilding[n] < cap]
            if room:
                return room[0]
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._room.wait(), ROOM_POLL_S)
            self._shards.stale()

    async def recover_orphans(self, held: set[str]) -> None:
        """At start: streams with a log that no live shard holds are rebuilt."""
        if self._log is None:
            return
        orphans = [sid for sid in await asyncio.to_thread(self._log.list_streams) if sid not in held]
        if not orphans:
            return
        log.warning("recovering %d stream(s) found in the frame logs but on no shard", len(orphans))
        for sid in orphans:
            self._recovering.setdefault(sid, "log")
        self._episodes.append({"from": "log", "streams": len(orphans), "started": time.time(),
                               "seconds": None, "frames": 0})
        self.retry()

    async def forget(self, sid: str) -> bool:
        """A recovering stream was deleted: drop its log and entry. True if it was recovering."""
        if self._recovering.pop(sid, None) is None:
            return False
        self._quarantined.discard(sid)
        self._recovery_errors.pop(sid, None)
        if self._log is not None:
            await asyncio.to_thread(self._log.delete, sid)
        self._map.delete(sid)
        return True

    # ------------------------------------------------------------------ shutdown
    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Refuse changes from now on; every live shard refuses new requests, finishes what it
        admitted (up to `timeout_s`) and fsyncs its logs."""
        self._draining = True
        names = [n for n in self._shards.names() if n not in self._dead]
        results = await asyncio.gather(*(self._shards.handle(n).drain.remote(timeout_s) for n in names),
                                       return_exceptions=True)
        return {n: (r if isinstance(r, dict) else {"error": str(r)}) for n, r in zip(names, results)}
