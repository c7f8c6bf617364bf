"""`mosaic-ray demo --serve` end to end: the tiny model in a shard behind Serve, the video pushed
and the questions asked through the HTTP client, on the session's Ray cluster."""

from __future__ import annotations

import re

import pytest

from mosaic_ray.cli import main
from mosaic_ray.demo_script import QUESTIONS

pytestmark = pytest.mark.ray


def test_the_demo_runs_through_the_http_api(ray_cluster, capsys):
    rc = main(["demo", "--serve", "--model", "tiny", "--max-frames", "6", "--port", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ingested 6 frames" in out
    assert [f"Q: {q}" in out for q in QUESTIONS] == [True] * 3
    assert len(re.findall(r"^A: ", out, re.M)) == 3
    assert len(re.findall(r"first delta \d+ ms, total \d+ ms", out)) == 3
    assert "Serve shut down" in out
    actors = ray_cluster.util.list_named_actors(all_namespaces=True)
    assert not [a for a in actors if a["name"].startswith("demo:")], actors  # the runtime is gone
