"""ShardPool: the router's shards: their handles by name, their health as last seen, the placements
in flight on each, and their load reports.

Held by `Router` (router.py) and given to its `RecoveryManager` (recovery.py), which replaces dead
shards through it. Constructed with:

    cfg       the `RuntimeConfig` (shard names, timeouts, load weights)
    counts    counts() -> stream -> shard counts of the map (`StreamMap.count_by_shard`)
    on_death  on_death(shard, reason): a call found the shard's actor dead (the router's recovery)

Verbs:

    names / handle / `in`          the shards, one's handle (None: not a shard of this runtime)
    call(shard, method, *args)     a remote method; a dead actor calls `on_death` and, like an
                                   unreachable one, raises `ShardUnavailableError`; an error
                                   raised by the method crosses as itself (`unwrap_ray_error`)
    mark_unhealthy / mark_healthy / healthy     health as last seen (unhealthy: nothing placed there)
    reserve(shard)                 a placement in flight there (counted as a stream by `by_load`)
    by_load / least_loaded / fresh_reports / stale      load: healthy shards by score, the reports
    spawn / kill / install         a replacement actor under a dead one's name
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import ShardUnavailableError, unwrap_ray_error
from mosaic_ray.runtime.actors.load import LoadReport, by_load
from mosaic_ray.runtime.actors.shard import ShardActor


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


class ShardPool:
    def __init__(self, cfg: RuntimeConfig, counts: Callable[[], dict[str, int]],
                 on_death: Callable[[str, str], None]) -> None:
        self._cfg = cfg
        self._counts = counts
        self._on_death = on_death
        self._handles = {cfg.shard_name(i): spawn_shard(cfg, i) for i in range(cfg.num_shards)}
        self._unhealthy: dict[str, str] = {}
        self._reserved: dict[str, int] = {}  # placements in flight, per shard
        self._reports: dict[str, LoadReport] = {}
        self._reports_at = 0.0

    # ------------------------------------------------------------------ the shards
    def names(self) -> list[str]:
        return sorted(self._handles)

    def handle(self, shard: str) -> Any | None:
        return self._handles.get(shard)

    def __contains__(self, shard: str) -> bool:
        return shard in self._handles

    async def call(self, shard: str, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handles[shard], method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            if isinstance(exc, ray.exceptions.ActorDiedError):
                self._on_death(shard, str(exc))
            else:
                self._unhealthy[shard] = str(exc)
            raise ShardUnavailableError(f"shard {shard} is unavailable") from None
        except ray.exceptions.RayTaskError as exc:
            raise unwrap_ray_error(exc) from None

    # ------------------------------------------------------------------ health
    def mark_unhealthy(self, shard: str, reason: str) -> None:
        self._unhealthy[shard] = reason

    def mark_healthy(self, shard: str) -> None:
        self._unhealthy.pop(shard, None)

    def healthy(self) -> dict[str, bool]:
        """Shard name -> healthy (as of the last probe)."""
        return {name: name not in self._unhealthy for name in self.names()}

    def reason(self, shard: str) -> str:
        """Why `shard` is unhealthy, or "ok"."""
        return self._unhealthy.get(shard, "ok")

    # ------------------------------------------------------------------ load
    @contextmanager
    def reserve(self, shard: str) -> Iterator[None]:
        self._reserved[shard] = self._reserved.get(shard, 0) + 1
        try:
            yield
        finally:
            self._reserved[shard] -= 1

    async def by_load(self) -> list[str]:
        """Healthy shards, least loaded first (ties by name)."""
        reports = await self.fresh_reports(self._cfg.router.load_cache_s)
        counts = self._counts()
        w = self._cfg.router.weights
        scores = {n: dataclasses.replace(r, streams=counts.get(n, 0) + self._reserved.get(n, 0)).score(w)
                  for n, r in reports.items()}
        if not scores:
            raise ShardUnavailableError("no healthy shard")
        return by_load(scores)

    async def least_loaded(self) -> str:
        return (await self.by_load())[0]

    async def fresh_reports(self, max_age_s: float) -> dict[str, LoadReport]:
        """Load reports of the healthy shards, reusing ones younger than `max_age_s`."""
        if time.monotonic() - self._reports_at > max_age_s:
            names = [n for n in self.names() if n not in self._unhealthy]
            results = await asyncio.gather(*(self._handles[n].load.remote() for n in names), return_exceptions=True)
            self._reports = {}
            for name, res in zip(names, results):
                if isinstance(res, ray.exceptions.ActorDiedError):
                    self._on_death(name, str(res))
                elif isinstance(res, BaseException):
                    self._unhealthy[name] = str(unwrap_ray_error(res))
                elif not res.healthy:
                    self._unhealthy[name] = "engine broken"
                else:
                    self._reports[name] = res
            self._reports_at = time.monotonic()
        return {n: r for n, r in self._reports.items() if n not in self._unhealthy}

    def stale(self) -> None:
        """The next `by_load` asks every shard afresh."""
        self._reports_at = 0.0

    # ------------------------------------------------------------------ replacement
    def spawn(self, shard: str) -> Any:
        """A handle of a fresh actor under `shard`'s name (not installed until `install`)."""
        return spawn_shard(self._cfg, self._cfg.shard_names.index(shard))

    def kill(self, shard: str) -> None:
        try:
            ray.kill(self._handles[shard], no_restart=True)
        except Exception:
            pass

    def install(self, shard: str, handle: Any) -> None:
        """`handle` (ready) serves as `shard` from now on: healthy, placeable, load asked afresh."""
        self._handles[shard] = handle
        self._unhealthy.pop(shard, None)
        self._reports_at = 0.0
