"""Starting, finding and stopping a runtime (one router + its shards) by name.

Any number of callers (Serve ingress replicas, the CLI, tests) may call `connect_runtime` with the
same config: the first starts the router (which starts the shards), the others get the same
actors. The router is detached and restarted by Ray when it dies (`max_restarts=-1`); nothing
stops it but `shutdown_runtime`, which a Serve app's replicas call when the app is deleted
(`serve/lifetime.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.runtime.durability.frame_log_stores import log_root, open_frame_log
from mosaic_ray.runtime.placement.router import Router
from mosaic_ray.runtime.placement.stream_map import open_store

RouterActor = ray.remote(Router)


def router_handle(config: RuntimeConfig) -> Any:
    return RouterActor.options(
        name=config.router_name,
        namespace=config.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        # Placement bookkeeping is light; the router must never wait for a CPU behind engines.
        num_cpus=0,
    ).remote(config.model_dump())


async def connect_runtime(config: RuntimeConfig, timeout_s: float = 120.0) -> Any:
    """The runtime's router handle, once the router and every shard answer. A router that Ray is
    restarting answers `ActorUnavailableError` meanwhile: asked again every 0.2 s (tenacity), up
    to `timeout_s`, then that error is raised."""
    router = router_handle(config)
    async for attempt in AsyncRetrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(0.2), reraise=True,
                                       retry=retry_if_exception_type(ActorUnavailableError)):
        with attempt:
            await router.ready.remote()
    return router


def shutdown_runtime(config: RuntimeConfig, forget_streams: bool = False) -> None:
    """Kill the router and the shards. Their streams' frame logs stay: a runtime started again
    with the same config rebuilds them (`drain_runtime` first makes every acknowledgement
    durable). With `forget_streams`, also clear the persisted stream map and delete the frame
    logs, so a new runtime of the same name starts empty."""
    names = [config.router_name, *config.shard_names]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=config.namespace), no_restart=True)
        except ValueError:
            pass  # not running
    if forget_streams:
        store = open_store(config.router.state_store, config.name, config.namespace)
        for stream_id in store.load():
            store.delete(stream_id)
        if config.durability.enabled:
            log = open_frame_log(config.durability, config.name)
            for stream_id in log.list_streams():
                log.delete(stream_id)
            log.close()
            if config.durability.store == "disk":
                try:
                    log_root(config.durability, config.name).rmdir()  # only when empty
                except OSError:
                    pass


async def drain_runtime(config: RuntimeConfig, timeout_s: float = 30.0) -> dict[str, Any]:
    """Graceful stop, before `shutdown_runtime`: the router refuses changes and every shard refuses
    new requests (503), waits up to `timeout_s` for the admitted ones, and fsyncs its frame logs."""
    router = router_handle(config)
    return await asyncio.wait_for(router.drain.remote(timeout_s), timeout_s + 10)
