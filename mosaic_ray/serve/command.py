"""`mosaic-ray serve --config cluster_configs/local.yaml`: start (or join) Ray, run the Serve app,
wait for Ctrl-C / SIGTERM, then take the app down.

The file is a `LaunchConfig` (`serve/config.py`). Flags override a few fields for quick runs:
`--port`, `--host`, `--num-shards`, `--engine package.module:factory`, `--address`.

Stopping (SIGTERM or Ctrl-C), in this order:
1. drain: the router refuses new streams and every shard refuses new requests (503 +
   Retry-After), finishes the ones it admitted (up to `drain_timeout_s`) and fsyncs its frame logs;
2. with a private cluster (no `ray.address`) Ray shuts down with everything in it; on a shared
   cluster the app is deleted and the runtime's actors are killed, freeing their GPUs.
The frame logs stay: started again with the same config (same log root), the runtime finds the
streams there and rebuilds them (docs/reliability.md). Exit status 0 after a clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from mosaic_ray.serve.config import LaunchConfig

DEFAULT_CONFIG = "cluster_configs/local.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"a LaunchConfig YAML file (default {DEFAULT_CONFIG})")
    p.add_argument("--address", default=None, help="join this Ray cluster ('auto', 'ray://host:10001')")
    p.add_argument("--host", default=None, help="HTTP host to listen on")
    p.add_argument("--port", type=int, default=None, help="HTTP port")
    p.add_argument("--num-shards", type=int, default=None, help="shard actors (one GPU each)")
    p.add_argument("--engine", default=None, help="engine factory 'package.module:attr' (default: the config's)")


def load_config(path: str | Path, args: argparse.Namespace | None = None) -> LaunchConfig:
    with open(path) as f:
        raw: dict[str, Any] = yaml.safe_load(f) or {}
    if args is not None:
        _override(raw, ("ray", "address"), args.address)
        _override(raw, ("http", "host"), args.host)
        _override(raw, ("http", "port"), args.port)
        _override(raw, ("app", "runtime", "num_shards"), args.num_shards)
        _override(raw, ("app", "runtime", "engine", "factory"), args.engine)
    return LaunchConfig(**raw)


def _override(raw: dict, path: tuple[str, ...], value: Any) -> None:
    if value is None:
        return
    node = raw
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from mosaic_ray.runtime.bootstrap import drain_runtime, shutdown_runtime
    from mosaic_ray.serve.app import build_app

    cfg = load_config(args.config, args)
    if cfg.ray.address is None:
        # A private single-machine cluster: no usage reporting (FACTS.md "Ray in tests").
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address=cfg.ray.address or "local",
        num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
        num_gpus=cfg.ray.num_gpus if cfg.ray.address is None else None,
        object_store_memory=cfg.ray.object_store_memory if cfg.ray.address is None else None,
        include_dashboard=cfg.ray.include_dashboard,
        runtime_env=cfg.ray.runtime_env or None,
    )
    # Right after ray.init (which installs Ray's own SIGTERM handler): a stop asked while Serve
    # starts is kept, and honoured once it has started.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg.app.model_dump()), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    print(f"mosaic-ray: serving {cfg.app.runtime.num_shards} shard(s) at {url}  (Ctrl-C to stop)", flush=True)

    stop.wait()
    print("mosaic-ray: stopping: draining the shards", flush=True)
    try:
        drained = asyncio.run(drain_runtime(cfg.app.runtime, cfg.drain_timeout_s))
        unfinished = sum(d.get("unfinished", 0) for d in drained.values())
        print(f"mosaic-ray: drained {len(drained)} shard(s), {unfinished} request(s) cut off", flush=True)
    except Exception as exc:  # still stop: acknowledged frames are in the logs whatever happens here
        print(f"mosaic-ray: drain failed ({type(exc).__name__}: {exc})", flush=True)
    if cfg.ray.address is None:
        ray.shutdown()  # the private cluster goes, and the app and the runtime with it
    else:
        # On a shared cluster, free the GPUs too: the router and shards are detached actors.
        # Their streams stay in the frame logs, for the next start.
        serve.delete(cfg.app_name)
        shutdown_runtime(cfg.app.runtime)
    return 0
