"""A Serve app's runtime goes with the app: after `serve.delete(app)` or `serve.shutdown()`, no
router or shard actor of it is alive and its (logical) GPUs are free (`serve/lifetime.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.fake_engine import fake_app_config
from tests.serve.app_lifetime import SERVE_YAML, SMALL_NODE, check_runtime_goes_with_app, serve_yaml_sized

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


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


def test_serve_shutdown_stops_the_runtime():
    """In a subprocess with its own Ray of serve.yaml's small node (a ready app proves that its
    requests fit): `serve.shutdown` here would stop the session's Serve."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_TMPDIR")}
    proc = subprocess.run([sys.executable, "-m", "tests.serve.app_lifetime"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: serve.yaml's requests fit the small node; serve.shutdown stopped" in proc.stdout
