"""scaling_bench/cluster_storage.py --quick: slab size changes storage, never the clusters."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("cluster_storage", ROOT / "scaling_bench" / "cluster_storage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smaller_slabs_hold_the_same_clusters_in_less_memory(tmp_path):
    assert _script().main(["--quick", "--out", str(tmp_path)]) == 0
    rows = {r["slab_tokens"]: r for r in json.loads((tmp_path / "cluster_storage.json").read_text())["rows"]}
    big, small = rows[16], rows[4]
    for key in ("past_tokens", "clusters_per_group", "mean_cluster_tokens", "singleton_token_share"):
        assert big[key] == small[key], key
    assert 0 < big["slab_fill"] < small["slab_fill"] <= 1
    assert small["host_bytes"] < big["host_bytes"]
    assert "| 0.15 | 4 |" in (tmp_path / "cluster_storage.md").read_text()
