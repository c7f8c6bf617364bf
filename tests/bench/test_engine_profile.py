"""scaling_bench/engine_profile.py --quick runs on CPU and writes a table with every batch size."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_engine_profile_quick(tmp_path):
    proc = subprocess.run([sys.executable, "scaling_bench/engine_profile.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "engine_profile.json").read_text())
    assert [r["streams"] for r in res["ingest"]] == [1, 4]
    assert all(r["frames_per_s"] > 0 and r["vision_ms"] > 0 for r in res["ingest"])
    assert [q["questions"] for q in res["questions"]] == [1, 2]
    assert all(q["tokens"] > 0 for q in res["questions"])
    assert "| 4 |" in (tmp_path / "engine_profile.md").read_text()
