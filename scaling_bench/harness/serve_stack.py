"""Start and stop the things a scaling benchmark measures: a runtime (router + shards) alone, or
the same runtime behind the Serve HTTP app, on whatever Ray cluster `ray_env` joined."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_running() -> bool:
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


class Stack:
    """`runtime(cfg)` / `app(cfg)` start one runtime (optionally with its Serve app); `drop(cfg)`
    stops it; `close()` stops Serve if this object started it."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._started_serve = False

    def runtime(self, cfg: dict[str, Any]) -> None:
        from mosaic_ray.runtime.bootstrap import connect_runtime
        from mosaic_ray.runtime.config import RuntimeConfig

        asyncio.run(connect_runtime(RuntimeConfig(**cfg)))

    def app(self, cfg: dict[str, Any], replicas: int = 1) -> str:
        """Deploy the Serve app of runtime `cfg` at '/'; returns the base URL."""
        from ray import serve

        from mosaic_ray.serve.app import build_app

        if self.url is None:
            if _serve_running():
                # A cluster's own Serve: its HTTP port is whatever it was started with.
                port = serve.context._global_client.http_config.port if serve.context._global_client else 8000
            else:
                port = free_port()
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                self._started_serve = True
            self.url = f"http://127.0.0.1:{port}"
        serve.run(build_app({"runtime": cfg, "ingress": {"num_cpus": 0, "num_replicas": replicas}}),
                  name=f"bench-{cfg['name']}", route_prefix="/")
        return self.url

    def shard_metrics(self, cfg: dict[str, Any]) -> list[dict[str, Any]]:
        """`ShardActor.metrics` of every shard of runtime `cfg`."""
        import ray

        from mosaic_ray.runtime.config import RuntimeConfig

        config = RuntimeConfig(**cfg)
        shards = [ray.get_actor(n, namespace=config.namespace) for n in config.shard_names]
        return ray.get([s.metrics.remote() for s in shards])

    def drop(self, cfg: dict[str, Any], app: bool = False) -> None:
        from mosaic_ray.runtime.bootstrap import shutdown_runtime
        from mosaic_ray.runtime.config import RuntimeConfig

        if app:
            from ray import serve

            serve.delete(f"bench-{cfg['name']}")
        shutdown_runtime(RuntimeConfig(**cfg), forget_streams=True)

    def close(self) -> None:
        if self._started_serve:
            from ray import serve

            serve.shutdown()


@contextmanager
def bench_stack(num_gpus: int, keep_logs: str | None = None) -> Iterator[Stack]:
    """Ray (the cluster a job runs in, else a private one with `num_gpus` logical GPUs:
    `ray_env.start_ray`) and a `Stack` on it; Serve and a private Ray are stopped on exit (a
    private one's logs copied to `keep_logs` first)."""
    from scaling_bench.harness.ray_env import start_ray

    session = start_ray(num_gpus=num_gpus)
    stack = Stack()
    try:
        yield stack
    finally:
        stack.close()
        session.close(keep_logs)
