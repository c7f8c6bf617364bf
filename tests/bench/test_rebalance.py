"""scaling_bench/rebalance.py --quick as a plain script on CPU: two logical shards, streams skewed
onto shard 0, the router's rebalance and explicit moves over gloo, answers of moved streams equal
to their unmoved twins'. The script starts its own private Ray in its subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling_bench.harness.ray_env import QUIET_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 90  # tiny model, 2 streams + 2 twins of 8 frames: ~15-25 s on 2 cores


def script_env() -> dict[str, str]:
    """The script starts its own Ray: nothing of a surrounding cluster may leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_TMPDIR")}
    return {**env, **QUIET_ENV, "OMP_NUM_THREADS": "1"}


def test_quick_rebalance(tmp_path):
    t0 = time.monotonic()
    cmd = [sys.executable, "scaling_bench/rebalance.py", "--quick", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote " in proc.stdout
    res = json.loads((tmp_path / "rebalance.json").read_text())
    assert (tmp_path / "rebalance.png").stat().st_size > 1000
    table = (tmp_path / "rebalance.md").read_text()
    assert table.startswith("Machine: ") and "|---|" in table and "2 shards" in table
    assert res["quick"] is True and res["shards"] == 2 and res["machine"]["device"]

    shard0, shard1 = res["shard_names"]
    before = {r["shard"]: r for r in res["loads_before"]}
    after = {r["shard"]: r for r in res["loads_after"]}
    assert before[shard0]["streams"] == 2 * res["streams"] and before[shard1]["streams"] == 0  # skewed
    moves = res["rebalance"]["moves"]
    assert moves and all(m["source"] == shard0 and m["transport"] == "distributed" for m in moves)
    assert res["rebalance"]["wall_s"] > 0
    assert res["imbalance_after"] < res["imbalance_before"]  # more even
    assert abs(after[shard0]["score"] - after[shard1]["score"]) < before[shard0]["score"] - before[shard1]["score"]

    assert len(res["moves"]) == 2
    for m in res["moves"]:
        assert m["transport"] == "distributed" and m["seconds"] > 0 and m["kv_bytes_host"] > 0
        assert m["gb_per_s"] > 0 and m["s_per_stream_hour"] > 0 and m["source"] != m["target"]

    assert res["identity_all_equal"], res["identity"]
    assert res["identity_moved_vs_unmoved"] >= 1
    assert all(r["answers"][0] for r in res["identity"])  # non-empty answers were compared
    assert time.monotonic() - t0 < TIMEOUT_S
