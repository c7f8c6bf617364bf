"""The scaling benchmarks (scaling_bench/streams_per_gpu.py, query_latency.py, shard_scaling.py):
each one's --quick mode once as a plain script, and one of them through `ray job submit` against a
local Ray cluster with a job server (its own `ray start --head`, stopped by process group at the end).

Each script starts its own private Ray in its subprocess (not the session cluster). Set
MOSAIC_SKIP_RAY_JOB=1 to skip the `ray job submit` test (it starts a second cluster: ~30-60 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from scaling_bench.harness.ray_env import QUIET_ENV
from scaling_bench.harness.serve_stack import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPT_TIMEOUT_S = 170  # --quick is meant to finish in under two minutes


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_TMPDIR")}
    return {**env, **QUIET_ENV, "OMP_NUM_THREADS": "1"}


def check_outputs(out: Path, name: str) -> dict:
    res = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 1000
    table = (out / f"{name}.md").read_text()
    assert table.startswith("Machine: ") and "|---|" in table
    assert res["quick"] is True and res["machine"]["device"] and res["rows"]
    return res


def check_result(name: str, res: dict) -> None:
    if name == "streams_per_gpu":
        for row in res["rows"]:
            assert row["steps"] and row["max_streams"] >= 1, row  # one tiny-model stream always keeps up
            assert all(s["frames_acked"] > 0 for s in row["steps"])
    elif name == "query_latency":
        assert {r["method"] for r in res["rows"]} == {"full", "cluster"}  # --quick: two methods
        assert {r["path"] for r in res["rows"]} == {"http", "direct"}
        for r in res["rows"]:
            assert r["errors"] == 0 and r["ttft"]["n"] > 0, r
            assert 0 < r["ttft"]["p50_ms"] <= r["e2e"]["p50_ms"] + 1e-6
    else:
        assert [r["shards"] for r in res["rows"]] == list(range(1, len(res["rows"]) + 1))
        assert res["rows"][0]["efficiency_frames"] == pytest.approx(1.0)
        for r in res["rows"]:
            assert r["errors"] == 0 and r["frames_acked"] > 0 and r["questions"] > 0, r


@pytest.mark.parametrize("name", ["streams_per_gpu", "query_latency", "shard_scaling"])
def test_quick_mode(name, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, f"scaling_bench/{name}.py", "--quick", "--no-progress", "--out", str(tmp_path)],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote " in proc.stdout  # the short printed summary
    check_result(name, check_outputs(tmp_path, name))
    assert time.monotonic() - t0 < SCRIPT_TIMEOUT_S


def _wait_http(url: str, deadline: float, head: subprocess.Popen) -> None:
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer")


@pytest.fixture
def ray_head():
    """`ray start --head --block` with a dashboard (job server) on free ports, in its own process
    group: stopping kills that group only (never `ray stop`, which stops every Ray on the machine)."""
    if os.environ.get("MOSAIC_SKIP_RAY_JOB"):
        pytest.skip("MOSAIC_SKIP_RAY_JOB is set")
    if not (BIN / "ray").exists():
        pytest.skip("no ray CLI next to this Python")
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    dash = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=8", "--num-gpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--temp-dir={tmp}", "--object-store-memory=209715200",
           "--disable-usage-stats"]
    log = open(Path(tmp) / "head.log", "w")
    head = subprocess.Popen(cmd, cwd=tmp, env={**script_env(), "RAY_TMPDIR": tmp}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/version", time.monotonic() + 90, head)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        subprocess.run(["rm", "-rf", tmp], timeout=30)


def test_shard_scaling_as_ray_job(ray_head, tmp_path):
    excludes = json.dumps({"excludes": [".git", "docs/results", "**/__pycache__", "scratch"]})
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={ray_head}", "--working-dir=.",
           f"--runtime-env-json={excludes}", "--",
           "python", "scaling_bench/shard_scaling.py", "--quick", "--max-shards=2", "--no-progress",
           f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout.lower()
    res = check_outputs(tmp_path, "shard_scaling")
    assert [r["shards"] for r in res["rows"]] == [1, 2]
    assert res["rows"][0]["frames_acked"] > 0
