"""Shared fixtures: one local Ray cluster per pytest session, and one Serve app on it.

Ray starts only for tests that ask for `ray_cluster` (or `serve_url`); the rest of the suite never
pays for it. Settings for a quiet, fast Ray: token auth and usage stats off, logical GPUs
so several shard actors fit on a CPU machine, a short temp dir (Unix socket paths are limited).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

# Kernel tests run Triton in its interpreter on CPU machines; it must be set before anything
# imports mosaic_ray.kernels (a CUDA machine runs them compiled with TRITON_INTERPRET=0).
if not os.environ.get("TRITON_INTERPRET") and not shutil.which("nvidia-smi"):
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]

# `tests.runtime.fake_engine` must import in this process and in every Ray worker.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.update({
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_prestart_worker_first_driver": "0",
})

# Logical resources of the test cluster: room for the Serve app's shards and a test runtime's.
RAY_CPUS = 8
RAY_GPUS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    # Frame logs of runtimes whose config names no root (DurabilitySpec.root): this session's own.
    os.environ["MOSAIC_RAY_LOG_DIR"] = os.path.join(tmp, "log")
    ray.init(
        address="local",
        num_cpus=RAY_CPUS,
        num_gpus=RAY_GPUS,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        _temp_dir=tmp,
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Base URL of a Serve app (fake engine, 2 shards) shared by the serve and client tests."""
    from ray import serve

    from mosaic_ray.runtime.bootstrap import shutdown_runtime
    from mosaic_ray.runtime.config import RuntimeConfig
    from mosaic_ray.serve.app import build_app
    from tests.runtime.fake_engine import fake_app_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = fake_app_config("httptest")
    serve.run(build_app(cfg), name="mosaic-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("mosaic-test")
    shutdown_runtime(RuntimeConfig(**cfg["runtime"]), forget_streams=True)


@pytest.fixture(scope="module")
def http(serve_url):
    """An HTTP client of the shared Serve app, one per test module."""
    import httpx

    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c
