"""The fidelity harness (scaling_bench/fidelity.py) in --quick mode on the tiny model, and its metric."""

import json
import math

import pytest
import torch

from scaling_bench.harness import fidelity
from mosaic_ray.cache.token_batch import Retrieved

BUDGETS = ("0.05", "0.1", "0.2")
METHODS = ("full", "frame", "token", "cluster")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    assert fidelity.main(["--model", "tiny", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "fidelity.json").read_text())


def test_writes_json_png_and_table(quick_run):
    out, res = quick_run
    assert (out / "fidelity.png").stat().st_size > 1000
    table = (out / "fidelity.md").read_text()
    assert "| method | budget |" in table and "cluster" in table
    assert res["schema"] == fidelity.SCHEMA and res["settings"]["quick"] is True
    assert list(res["models"]) == ["tiny"]


def test_structure_and_invariants(quick_run):
    _, res = quick_run
    m = res["models"]["tiny"]
    assert m["weights"] == "random-init" and "uniform" in m["note"]
    assert m["stream"]["past_tokens"] > 2 * res["settings"]["window"]
    assert len(m["questions"]) == 3 and all(q["past_tokens"] > 0 for q in m["questions"])
    # the harness's reference attention reproduces what the engine computed
    assert m["harness_check_rel_err"] < 1e-4
    assert set(m["methods"]) == set(METHODS)
    for name, entry in m["methods"].items():
        assert set(entry["budgets"]) == set(BUDGETS)
        assert entry["device_bytes"] >= entry["index_bytes"] > 0
        for b, a in entry["budgets"].items():
            for key in ("recall_mean", "recall_worst_layer", "past_recall_mean", "past_recall_worst_layer"):
                assert 0.0 <= a[key] <= 1.0 + 1e-6, (name, b, key, a[key])
            assert a["recall_worst_layer"] <= a["recall_mean"] + 1e-9
            assert a["out_err_mean"] >= 0 and math.isfinite(a["out_err_mean"])
            assert a["out_err_worst_layer"] >= a["out_err_mean"] - 1e-9
            assert len(a["recall_per_layer"]) == m["layout"]["num_layers"]
            assert a["mapping_errors"] == 0  # retrieved K/V are bit-exact with the stream's
            if name != "full":
                assert a["fill"] <= 1.0 + 1e-9  # never more than the budget
                assert a["copies_per_query"] > 0 and a["bytes_per_query"] > 0
    for b in BUDGETS:
        full = m["methods"]["full"]["budgets"][b]
        assert full["out_err_mean"] == 0.0 and full["recall_mean"] == 1.0 and full["past_recall_mean"] == 1.0
        assert full["copies_per_query"] == 0
        assert m["methods"]["token"]["budgets"][b]["fill"] == 1.0  # exactly B tokens per head
    full_bytes = m["methods"]["full"]["index_bytes"]
    assert m["methods"]["cluster"]["index_bytes"] < full_bytes
    assert m["methods"]["frame"]["index_bytes"] < m["methods"]["token"]["index_bytes"] < full_bytes
    assert set(m["targets"]) == set(BUDGETS)


def _retrieved(order: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> Retrieved:
    H, B = order.shape
    return Retrieved(keys, values, order, torch.zeros(H, B, 1, dtype=torch.int32), torch.ones(H, B, dtype=torch.bool))


def test_recall_is_relative_to_exact_top_b_by_true_mass():
    g = torch.Generator().manual_seed(0)
    H, N, D, B = 2, 50, 4, 5
    p = torch.rand(H, N, generator=g) ** 4
    p = 0.5 * p / p.sum(1, keepdim=True)
    order = torch.arange(100, 100 + N)
    k, v = torch.randn(H, N, D, generator=g), torch.randn(H, N, D, generator=g)
    ref = fidelity.Reference(torch.ones(1, 1, D), torch.full((H,), 0.5), p, order, k, v)

    def take(idx):
        idx = torch.sort(idx, 1).values
        at = idx[..., None].expand(-1, -1, D)
        return _retrieved(order[idx], k.gather(1, at), v.gather(1, at))

    best = fidelity._metrics_for(ref, take(torch.topk(p, B, 1).indices), B, torch.ones(1, 1, D))
    assert best["recall"] == pytest.approx(1.0) and best["past_recall"] == pytest.approx(1.0)
    assert best["out_err"] == 0.0 and best["mapping_errors"] == 0
    worst = fidelity._metrics_for(ref, take(torch.topk(-p, B, 1).indices), B, torch.ones(1, 1, D))
    assert worst["past_recall"] < 0.5 and worst["past_recall"] < worst["recall"] < 1.0
    wrong = take(torch.topk(p, B, 1).indices)
    wrong.values[0, 0] += 1  # a value that is not the stream's is caught
    assert fidelity._metrics_for(ref, wrong, B, torch.ones(1, 1, D))["mapping_errors"] == 1


def test_the_default_variant_replays_the_engines_defaults():
    from scaling_bench.harness.fidelity import Variant
    from mosaic_ray.config import CacheConfig, ClusterConfig

    got = Variant("cluster", "cluster").cache_config(sink=16, window=256, capacity_bytes=1 << 20)
    assert got.cluster.variance_ratio == ClusterConfig().variance_ratio
    assert got.pool.slab_tokens == CacheConfig(retrieval="cluster").pool.slab_tokens
