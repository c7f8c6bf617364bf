"""Load through HTTP with a shard killed in the middle: streams ingest and ask questions for a
fixed time (`scaling_bench.harness.reliability_load`); afterwards frames acknowledged == frames stored,
every question answered, and the 503 rate and answer p99 are printed.

CI runs the quick form (a few seconds of load); MOSAIC_LOAD_FULL=1 runs the full one (16 streams,
60 s). `scaling_bench/reliability_load.py` runs the same outside pytest."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import ray

from scaling_bench.harness.reliability_load import ReliabilityLoadSpec, run_reliability_load
from mosaic_ray.runtime.bootstrap import shutdown_runtime
from mosaic_ray.runtime.config import RuntimeConfig
from tests.runtime.fake_engine import fake_app_config

pytestmark = pytest.mark.ray

FULL = os.environ.get("MOSAIC_LOAD_FULL") == "1"
SPEC = (ReliabilityLoadSpec(streams=16, seconds=60.0, fps=8.0, batch_frames=4, question_every_s=2.0, kill_after_s=20.0)
        if FULL else
        ReliabilityLoadSpec(streams=4, seconds=6.0, fps=8.0, batch_frames=4, question_every_s=1.0, kill_after_s=2.0))
ROUTE = "/load"


@pytest.fixture(scope="module")
def load_app(serve_url, tmp_path_factory):
    from ray import serve

    from mosaic_ray.serve.app import build_app

    cfg = fake_app_config("loadtest")
    cfg["runtime"]["router"] = {"health_interval_s": 1.0}
    cfg["runtime"]["durability"] = {"root": str(tmp_path_factory.mktemp("loadlog"))}
    runtime = RuntimeConfig(**cfg["runtime"])
    shutdown_runtime(runtime, forget_streams=True)
    serve.run(build_app(cfg), name="mosaic-load", route_prefix=ROUTE)
    yield f"{serve_url}{ROUTE}", runtime
    serve.delete("mosaic-load")
    shutdown_runtime(runtime, forget_streams=True)


def test_load_with_a_shard_killed_loses_no_acknowledged_frame(load_app):
    url, runtime = load_app

    async def kill() -> str:
        name = runtime.shard_name(0)
        ray.kill(ray.get_actor(name, namespace=runtime.namespace), no_restart=True)
        return name

    out = asyncio.run(run_reliability_load(url, SPEC, kill))
    print("\nLOAD", json.dumps(out))
    if os.environ.get("MOSAIC_RELIABILITY_OUT"):
        with open(os.environ["MOSAIC_RELIABILITY_OUT"], "a") as f:
            f.write(json.dumps({"test": "load", **out}) + "\n")
    assert out["errors"] == 0, out["first_errors"]
    assert out["killed"]["shard"] == runtime.shard_name(0)
    assert out["frames_acked"] == out["frames_stored"] and not out["lost_streams"]
    assert out["frames_acked"] > 0 and out["answers"] > 0
    assert out["statuses"].get(500, 0) == 0


def test_recovery_and_shutdown_errors_are_503_with_retry_after():
    from mosaic_ray.runtime.errors import ShuttingDownError, StreamRecoveringError
    from mosaic_ray.runtime.durability.frame_log import LogWriteError
    from mosaic_ray.serve.errors import response_for

    for exc, code, after in [(StreamRecoveringError("rebuilding", 2.0), "stream_recovering", "2"),
                             (ShuttingDownError("stopping"), "shutting_down", "5"),
                             (LogWriteError("disk full"), "log_unavailable", "1")]:
        resp = response_for(exc)
        assert resp.status_code == 503 and resp.headers["retry-after"] == after
        assert json.loads(resp.body)["error"]["code"] == code
