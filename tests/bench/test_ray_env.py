"""A Ray benchmark on a cluster that cannot place it exits at once with one line (`ray_env`), and
its results go where --out says, as an absolute path (`cli.out_dir`). No Ray cluster is started:
the cluster's resources are fakes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_bench.harness import cli
from scaling_bench.harness.ray_env import missing_resources

ROOT = Path(__file__).resolve().parents[2]
NO_GPU = {"CPU": 2.0, "memory": 4e9, "object_store_memory": 1e9}


def test_missing_gpus_named_with_the_fix():
    msg = missing_resources({"GPU": 3}, NO_GPU, NO_GPU)
    assert "GPU 0 of the 3 needed" in msg and "one per shard" in msg
    assert "ray start --head --num-gpus=3" in msg and "\n" not in msg


def test_enough_resources_pass():
    have = {**NO_GPU, "GPU": 4.0}
    assert missing_resources({"GPU": 3}, have, have) is None
    assert missing_resources({"GPU": 3}, have) is None


def test_gpus_held_by_other_actors_named():
    msg = missing_resources({"GPU": 2}, {**NO_GPU, "GPU": 2.0}, {**NO_GPU, "GPU": 0.0})
    assert "GPU 0 free of 2, 2 needed" in msg and "serve shutdown" in msg


# `start_ray` under a cluster (RAY_ADDRESS set) whose resources are NO_GPU: Ray itself is faked.
FAKE_CLUSTER = f"""
import ray
from scaling_bench.harness.ray_env import start_ray
ray.init = lambda *a, **k: None
ray.shutdown = lambda: None
ray.cluster_resources = ray.available_resources = lambda: {NO_GPU!r}
start_ray(num_gpus=2)
print("started")
"""


def test_start_ray_on_a_cluster_without_gpus_exits_nonzero():
    proc = subprocess.run([sys.executable, "-c", FAKE_CLUSTER], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "auto"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "started" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster has GPU 0 of the 2 needed"), last


def test_out_is_honoured_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.RAY_JOB_ENV, raising=False)
    p = argparse.ArgumentParser()
    cli.add_common(p)
    a = p.parse_args(["--quick", "--out", "res"])
    cli.resolve(a)
    assert a.out == str(tmp_path / "res")
    assert cli.out_dir(tmp_path / "x") == tmp_path / "x"
    default = p.parse_args([])
    cli.resolve(default)
    assert default.out == str(tmp_path / "docs" / "results")  # the documented default


def test_relative_out_refused_in_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.RAY_JOB_ENV, "{}")
    with pytest.raises(SystemExit) as e:
        cli.out_dir("docs/results")
    assert str(e.value.code).startswith("error: --out docs/results is relative")
    assert cli.out_dir(tmp_path) == tmp_path  # an absolute one is fine
