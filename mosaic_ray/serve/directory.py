"""StreamDirectory: how an ingress replica reaches the shard that owns a stream.

It asks the router once per stream and caches the answer, then calls the shard actor directly, so
the router is off the data path. A cached location is only a hint; the shard corrects it:

- a shard the stream left answers `StreamMovedError(new_shard)`: the directory follows it;
- a shard that never heard of the stream answers `UnknownStreamError`: when the location came
  from the cache, the directory asks the router again, once, before giving up;
- a shard that died (`ActorDiedError`) is reported to the router (`shard_failed`), which starts
  rebuilding its streams elsewhere from their frame logs; the directory asks the router again,
  which answers `StreamRecoveringError` (503 + Retry-After) until the stream is back.

A streamed call (`stream`) is retried only before its first item, so a client never sees a
delta twice. Ray's wrappers are removed: callers see the `EngineError` the shard raised, or
`ShardUnavailableError` when the shard's actor is dead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray
from tenacity import AsyncRetrying, retry_if_exception_type, retry_never, stop_after_attempt, wait_fixed

from mosaic_ray.engine.interface import UnknownStreamError
from mosaic_ray.runtime.bootstrap import connect_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.errors import ShardUnavailableError, StreamMovedError, unwrap_ray_error

# Router methods that change nothing: safe to retry while the router restarts (it takes ~1-3 s).
ROUTER_READS = frozenset({"locate", "list_streams", "shards", "health", "loads"})
ROUTER_READ_RETRIES = 25
ROUTER_RETRY_S = 0.2

# Redirects followed for one call: a stream that moves again while being followed is rare; more
# than this many hops means something is wrong.
MAX_HOPS = 4


class StreamDirectory:
    def __init__(self, config: RuntimeConfig, router: Any) -> None:
        self._cfg = config
        self.router = router
        self._where: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    @classmethod
    async def connect(cls, config: RuntimeConfig) -> StreamDirectory:
        return cls(config, await connect_runtime(config))

    async def ask_router(self, method: str, *args: Any) -> Any:
        """Call the router. While Ray restarts it, reads are retried for a moment (tenacity: every
        ROUTER_RETRY_S, ROUTER_READ_RETRIES times); changes are refused (503) at once, since Ray
        cannot tell whether the lost call ran."""
        async def once() -> Any:
            return await getattr(self.router, method).remote(*args)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(ROUTER_READ_RETRIES + 1), wait=wait_fixed(ROUTER_RETRY_S), reraise=True,
            retry=retry_if_exception_type(ray.exceptions.ActorUnavailableError) if method in ROUTER_READS
            else retry_never)
        try:
            return await retrying(once)
        except ray.exceptions.ActorUnavailableError:
            raise ShardUnavailableError("the router is restarting; retry") from None
        except Exception as exc:
            raise self._translate(exc, "router") from None

    async def call(self, stream_id: str, method: str, *args: Any) -> Any:
        """`shard.method(stream_id, *args)` on the stream's shard, following moves."""
        for _ in range(MAX_HOPS):
            shard, cached = await self._locate(stream_id)
            try:
                return await getattr(self.shard_handle(shard), method).remote(stream_id, *args)
            except Exception as exc:
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    await self._report_dead(stream_id, shard)
                    continue
                if not self._should_retry(stream_id, shard, cached, exc):
                    raise self._translate(exc, shard) from None
        raise ShardUnavailableError(f"stream {stream_id!r} kept moving; retry")

    async def stream(self, stream_id: str, method: str, *args: Any) -> AsyncIterator[Any]:
        """Items of the streaming generator `shard.method(stream_id, *args)`."""
        for _ in range(MAX_HOPS):
            shard, cached = await self._locate(stream_id)
            started = False
            try:
                async for ref in getattr(self.shard_handle(shard), method).remote(stream_id, *args):
                    item = await ref
                    started = True
                    yield item
                return
            except Exception as exc:
                if not started and isinstance(exc, ray.exceptions.ActorDiedError):
                    await self._report_dead(stream_id, shard)
                    continue
                if started or not self._should_retry(stream_id, shard, cached, exc):
                    raise self._translate(exc, shard) from None
        raise ShardUnavailableError(f"stream {stream_id!r} kept moving; retry")

    def forget(self, stream_id: str) -> None:
        self._where.pop(stream_id, None)

    async def _locate(self, stream_id: str) -> tuple[str, bool]:
        shard = self._where.get(stream_id)
        if shard is not None:
            return shard, True
        shard = await self.ask_router("locate", stream_id)
        self._where[stream_id] = shard
        return shard, False

    def _should_retry(self, stream_id: str, shard: str, cached: bool, exc: Exception) -> bool:
        cause = unwrap_ray_error(exc)
        if isinstance(cause, StreamMovedError):
            self._where[stream_id] = cause.shard
            return True
        if isinstance(cause, (UnknownStreamError, ShardUnavailableError)) and cached:
            self.forget(stream_id)  # the stream moved, or its shard died and has been replaced
            return True
        return False

    async def _report_dead(self, stream_id: str, shard: str) -> None:
        """Forget the dead shard's handle and the stream's place; tell the router (which answers
        for the stream from now on, 503 while it rebuilds it)."""
        self.forget(stream_id)
        self._handles.pop(shard, None)
        try:
            await self.router.shard_failed.remote(shard)
        except Exception:
            pass  # a router that is restarting finds the dead shard itself

    def shard_handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = ray.get_actor(shard, namespace=self._cfg.namespace)
            except ValueError:
                raise ShardUnavailableError(f"shard {shard} is not running") from None
            self._handles[shard] = handle
        return handle

    def _translate(self, exc: Exception, where: str) -> BaseException:
        if isinstance(exc, ray.exceptions.RayActorError):
            self._handles.pop(where, None)
            return ShardUnavailableError(f"{where} is unavailable")
        return unwrap_ray_error(exc)
