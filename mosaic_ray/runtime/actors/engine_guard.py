"""EngineGuard: how a shard calls its engine, and how it tells a failed request from a broken engine.

Held by `ShardActor` (shard.py); its `call` and `append` are what the actor and its collaborators
(`StreamDurability`, `MigrationEndpoint`, `IngestQueue`) are given to reach the engine. Every call
runs on the shard's engine thread (`EngineRunner`). Constructed with:

    shard             the shard's name (in log lines)
    engine            the engine
    runner            the shard's `EngineRunner`
    meter             the shard's `ShardMeter` (`errors_total` counts failed requests)
    health_timeout_s  how long a probe may take (`ShardSpec.health_timeout_s`)

Verbs: `call(fn, *args)` (a sync engine method), `append(stream_id, frames, stamps)` (frames
queued into the engine's step loop), `failure(exc)` (the error a request gets for `exc`);
`fatal` is None until the engine is found broken, and stays set from then on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from mosaic_ray.engine.interface import EngineError
from mosaic_ray.runtime.actors.engine_runner import EngineRunner
from mosaic_ray.runtime.errors import EngineFailedError, RequestFailedError
from mosaic_ray.runtime.actors.ingest import completed
from mosaic_ray.runtime.actors.shard_metrics import ShardMeter

log = logging.getLogger("mosaic_ray.runtime.actors.shard")


class EngineGuard:
    def __init__(self, shard: str, engine: Any, runner: EngineRunner, meter: ShardMeter,
                 health_timeout_s: float) -> None:
        self._shard = shard
        self._engine = engine
        self._runner = runner
        self._meter = meter
        self._health_timeout_s = health_timeout_s
        self.fatal: BaseException | None = None

    async def call(self, fn, *args):
        try:
            return await self._runner.call(fn, *args)
        except EngineError:
            raise
        except Exception as exc:
            raise await self.failure(exc) from None

    async def append(self, stream_id: str, frames: list[np.ndarray], stamps: list[float]):
        """Frames into the engine; returns, once they are queued on the engine's thread (or, for
        an engine without a step loop, appended), an awaitable of the frames the stream holds when
        they are in (`IngestQueue(queued=True)`: the stream's lock is not held while the step loop ingests
        them). An engine with a step loop queues them in its scheduler (`queue_frames`): the
        frames of every stream queued meanwhile share one vision batch and one forward, the only
        cross-stream batching there is. Other engines get one `append_frames` call per stream's batch."""
        queue = getattr(self._engine, "queue_frames", None)
        if queue is None:
            held = await self.call(self._engine.append_frames, stream_id, frames, stamps)
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
                raise await self.failure(exc) from None

        return ingested()

    async def failure(self, exc: BaseException) -> EngineError:
        """The error for a request whose engine call raised `exc` (not an `EngineError`). One
        request's failure is not evidence that the engine is broken: the engine is probed on a
        known-good input (`Engine.probe`), and the shard is marked broken only if that fails too
        (or does not answer within `health_timeout_s`). Otherwise the request fails alone."""
        self._meter.errors_total += 1
        log.warning("shard %s: a request failed in the engine: %s: %s", self._shard, type(exc).__name__, exc)
        if self.fatal is None:
            try:
                await asyncio.wait_for(self._runner.call(self._engine.probe), self._health_timeout_s)
            except EngineError:
                pass  # an engine that refuses sanely is not broken
            except BaseException as probe_exc:  # the timeout too: a hung engine is a broken one
                log.error("shard %s: the engine failed its probe after that (%s): broken", self._shard,
                          type(probe_exc).__name__)
                self.fatal = exc
        if self.fatal is not None:
            return EngineFailedError("engine failed; this shard is out of service")
        return RequestFailedError("the engine could not process this request; the shard is healthy")
