"""Does a Serve app's runtime (router + shard actors, logical GPUs) go with the app? Shared by
tests/serve/test_app_lifetime.py, in its process (`serve.delete`) and, as `python -m
tests.serve.app_lifetime`, in a subprocess with a private Ray (`serve.shutdown`, which would stop
the Serve instance the rest of the test session shares). The subprocess's Ray is the small node
cluster_configs/serve.yaml is sized for (2 CPUs, 2 GPUs), and its app asks what serve.yaml asks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mosaic_ray.runtime.bootstrap import shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from tests.runtime.fake_engine import fake_app_config

GONE_WITHIN_S = 30.0
SERVE_YAML = Path(__file__).resolve().parents[2] / "cluster_configs" / "serve.yaml"
SMALL_NODE = {"CPU": 2, "GPU": 2}  # what serve.yaml says it fits


def serve_yaml_sized(name: str) -> dict[str, Any]:
    """The fake-engine app config with serve.yaml's shard count and resource requests."""
    (app,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    args, cfg = app["args"], fake_app_config(name)
    cfg["runtime"]["num_shards"] = args["runtime"]["num_shards"]
    cfg["runtime"]["shard"].update({k: args["runtime"]["shard"][k] for k in ("num_cpus", "num_gpus")})
    cfg["ingress"].update({k: args["ingress"][k] for k in ("num_cpus", "num_replicas")})
    return cfg


def alive(runtime: RuntimeConfig) -> list[str]:
    """The runtime's router and shard actors that Ray still knows alive."""
    import ray

    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == runtime.namespace}
    return [n for n in (runtime.router_name, *runtime.shard_names) if n in names]


def free_gpus() -> float:
    import ray

    return ray.available_resources().get("GPU", 0.0)


def check_runtime_goes_with_app(cfg: dict[str, Any], stop: Callable[[], Any], route_prefix: str = "/") -> None:
    """Run app `cfg` (an AppConfig dict, app name = runtime name), check that its router and shards
    are alive holding their GPUs, `stop()`; then, within GONE_WITHIN_S, none of them is alive and
    the GPUs are free again."""
    from ray import serve

    from mosaic_ray.serve.app import build_app

    runtime = RuntimeConfig(**cfg["runtime"])
    before = free_gpus()
    try:
        serve.run(build_app(cfg), name=runtime.name, route_prefix=route_prefix)
        assert sorted(alive(runtime)) == sorted([runtime.router_name, *runtime.shard_names])
        assert free_gpus() == before - runtime.num_shards * runtime.shard.num_gpus
        stop()
        deadline = time.monotonic() + GONE_WITHIN_S
        while (alive(runtime) or free_gpus() < before) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive(runtime) == [], f"still alive after {GONE_WITHIN_S} s: {alive(runtime)}"
        assert free_gpus() == before, f"{free_gpus()} GPUs free, {before} before the app"
    finally:
        shutdown_runtime(runtime, forget_streams=True)  # nothing left behind, even on failure


def main() -> int:
    """A private Ray the size of SMALL_NODE and Serve on a free port; the app (serve.yaml's
    requests) must become ready there, and `serve.shutdown` must stop its runtime."""
    from ray import serve

    from scaling_bench.harness.ray_env import start_ray
    from scaling_bench.harness.serve_stack import free_port

    session = start_ray(num_gpus=SMALL_NODE["GPU"], num_cpus=SMALL_NODE["CPU"])
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        check_runtime_goes_with_app(serve_yaml_sized("lifeshutdown"), serve.shutdown)
    finally:
        session.close()
    print("OK: serve.yaml's requests fit the small node; serve.shutdown stopped the runtime and freed its GPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
