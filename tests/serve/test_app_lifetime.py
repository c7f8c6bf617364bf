"""A Serve app's runtime goes with the app: after `serve.delete(app)` or `serve.shutdown()`, no
router or shard actor of it is alive and its (logical) GPUs are free; a replica stopped while the
app stays leaves it running (`serve/lifetime.py`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve import lifetime
from tests.runtime.fake_engine import fake_app_config
from tests.serve.app_lifetime import SERVE_YAML, SMALL_NODE, alive, check_runtime_goes_with_app, serve_yaml_sized

ROOT = Path(__file__).resolve().parents[2]


def _release(monkeypatch, status) -> tuple[bool, list[str]]:
    """`release_with_app` with Serve's status faked (`status()` gives it, or raises) and the
    runtime's drain and kill recorded instead of done."""
    from ray import serve

    calls: list[str] = []

    async def drain(cfg, timeout_s):
        calls.append("drain")

    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(lifetime, "drain_runtime", drain)
    monkeypatch.setattr(lifetime, "shutdown_runtime", lambda cfg: calls.append("kill"))
    runtime = RuntimeConfig(**fake_app_config("unit")["runtime"])
    return asyncio.run(lifetime.release_with_app(runtime, "app")), calls


def _apps(**apps: str):
    return lambda: types.SimpleNamespace(applications={k: types.SimpleNamespace(status=v) for k, v in apps.items()})


@pytest.mark.parametrize("apps, released", [({"app": "DELETING"}, True), ({}, True), ({"other": "RUNNING"}, True),
                                            ({"app": "RUNNING"}, False), ({"app": "DEPLOYING"}, False),
                                            ({"app": "UNHEALTHY"}, False)])
def test_released_only_when_the_app_is_going(monkeypatch, apps, released):
    assert _release(monkeypatch, _apps(**apps)) == (released, ["drain", "kill"] if released else [])


def test_an_unanswered_status_keeps_the_runtime(monkeypatch):
    def down():
        raise ConnectionError("controller unreachable")

    assert _release(monkeypatch, down) == (False, [])


@pytest.mark.ray
def test_scale_down_keeps_the_runtime_delete_stops_it(serve_url):
    """Ingress replicas 2 -> 1: the stopped replica's `__del__` leaves the runtime to the other
    (the same router actor, every shard alive); deleting the app then stops it."""
    import ray
    from ray import serve

    from mosaic_ray.serve.app import build_app

    cfg = fake_app_config("lifescale")
    cfg["ingress"]["num_replicas"] = 2
    runtime = RuntimeConfig(**cfg["runtime"])

    def router_id() -> str:
        return ray.get_actor(runtime.router_name, namespace=runtime.namespace)._actor_id.hex()

    def scale_down_then_delete() -> None:
        first = router_id()
        serve.run(build_app({**cfg, "ingress": {**cfg["ingress"], "num_replicas": 1}}), name="lifescale",
                  route_prefix="/lifescale")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = serve.status().applications["lifescale"].deployments["MosaicIngress"].replica_states
            if states == {"RUNNING": 1}:
                break
            time.sleep(0.5)
        assert states == {"RUNNING": 1}
        time.sleep(2)  # the stopped replica's __del__ has run; give a wrong kill time to land
        assert sorted(alive(runtime)) == sorted([runtime.router_name, *runtime.shard_names])
        assert router_id() == first
        serve.delete("lifescale")

    check_runtime_goes_with_app(cfg, scale_down_then_delete, route_prefix="/lifescale")


@pytest.mark.ray
def test_delete_app_stops_its_runtime(serve_url):
    from ray import serve

    check_runtime_goes_with_app(fake_app_config("lifedelete"), lambda: serve.delete("lifedelete"),
                                route_prefix="/lifedelete")


def test_serve_yaml_fits_the_small_node_it_names():
    cfg = serve_yaml_sized("sizing")
    rt, ing = cfg["runtime"], cfg["ingress"]
    assert rt["num_shards"] * rt["shard"]["num_gpus"] <= SMALL_NODE["GPU"]
    assert rt["num_shards"] * rt["shard"]["num_cpus"] + ing["num_replicas"] * ing["num_cpus"] <= SMALL_NODE["CPU"]
    assert "2-CPU node with 2 GPUs fits" in SERVE_YAML.read_text()


@pytest.mark.ray
def test_serve_shutdown_stops_the_runtime():
    """In a subprocess with its own Ray of serve.yaml's small node (a ready app proves that its
    requests fit): `serve.shutdown` here would stop the session's Serve."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_TMPDIR")}
    proc = subprocess.run([sys.executable, "-m", "tests.serve.app_lifetime"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: serve.yaml's requests fit the small node; serve.shutdown stopped" in proc.stdout
