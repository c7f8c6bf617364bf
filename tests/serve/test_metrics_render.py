"""The Prometheus page, parsed back with prometheus_client: names, types and labels in vLLM's
shape under `mosaic_`, cumulative histogram buckets that match what was observed, and the engine
figures only for shards whose engine reports them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mosaic_ray.runtime.actors.shard_metrics import ShardMeter
from mosaic_ray.serve.metrics import CONTENT_TYPE_LATEST, render

TTFTS = (0.02, 0.04, 0.3, 0.3, 7.0)
ENGINE = {"busy_s_total": 3.5, "engine_utilization": 0.4, "ingest_lag_s_max": 0.25,
          "ingest_lag_s_by_stream": {"cam-2": 0.25, "cam-1": 0.0}, "frames_ingested_total": 5,
          "step_steps_total": 9, "step_decode_tokens_total": 5, "step_prefill_tokens_total": 40,
          "step_ingest_tokens_total": 600, "step_question_s_total": 1.5, "step_ingest_s_total": 0.5,
          "step_maintenance_s_total": 0.25, "step_ttft_start_s_total": 0.75, "step_first_tokens_total": 3,
          "pool_used_bytes": 100, "pool_capacity_bytes": 1000, "kv_pool_used_bytes": 30, "kv_pool_capacity_bytes": 120,
          "retrieval_bytes_total": 4096, "retrieval_copies_total": 12, "retrieval_tokens_total": 64, "clusters": 8}


def _shard(name: str, meter: ShardMeter, **engine) -> dict:
    return {**meter.snapshot(), **engine, "shard": name, "streams": 1, "kv_bytes_device": 10, "kv_bytes_host": 20,
            "pending_frames": 0, "active_queries": 0, "healthy": True}


@pytest.fixture
def families():
    meter = ShardMeter(10.0, (0.01, 0.05, 0.5, 1.0))
    for v in TTFTS:
        meter.ttft.observe(v)
    meter.prompt_tokens_total, meter.generation_tokens_total = 11, 4
    meter.finished["length"] = 2
    page = render([_shard("a", meter, **ENGINE), _shard("b", ShardMeter(10.0, (0.1,)))])
    return {f.name: f for f in text_string_to_metric_families(page.decode())}


def _value(family, **labels) -> float:
    [v] = [s.value for s in family.samples if all(s.labels.get(k) == x for k, x in labels.items())]
    return v


def test_names_types_and_labels(families):
    kinds = {  # parsed family names drop a counter's `_total`
        "mosaic_prompt_tokens": "counter", "mosaic_generation_tokens": "counter", "mosaic_request_success": "counter",
        "mosaic_e2e_request_latency_seconds": "histogram", "mosaic_time_to_first_token_seconds": "histogram",
        "mosaic_request_time_per_output_token_seconds": "histogram", "mosaic_num_requests_running": "gauge",
        "mosaic_num_requests_waiting": "gauge", "mosaic_kv_cache_usage_perc": "gauge", "mosaic_frames": "counter",
        "mosaic_frames_ingested": "counter", "mosaic_ingest_lag_seconds_max": "gauge",
        "mosaic_retrieval_bytes": "counter", "mosaic_retrieval_copies": "counter", "mosaic_clusters": "gauge",
        "mosaic_host_pool_used_bytes": "gauge", "mosaic_host_pool_capacity_bytes": "gauge",
        "mosaic_device_kv_pool_used_bytes": "gauge", "mosaic_streams": "gauge", "mosaic_step_tokens": "counter",
    }
    assert {n: families[n].type for n in kinds} == kinds
    assert not [n for n in families if n.endswith("queries_per_second")]  # no precomputed question rate
    for f in families.values():
        assert all("shard" in s.labels for s in f.samples), f.name
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
    success = families["mosaic_request_success"]
    assert {s.labels["finished_reason"] for s in success.samples} == {"stop", "length", "cancelled", "error"}
    assert _value(success, shard="a", finished_reason="length") == 2
    assert _value(families["mosaic_prompt_tokens"], shard="a") == 11
    assert _value(families["mosaic_generation_tokens"], shard="a") == 4
    assert _value(families["mosaic_kv_cache_usage_perc"], shard="a") == 0.25  # the device KV pool's
    assert _value(families["mosaic_step_tokens"], shard="a", kind="ingest") == 600
    assert _value(families["mosaic_stream_ingest_lag_seconds"], shard="a", stream="cam-2") == 0.25
    assert _value(families["mosaic_kv_bytes"], shard="b", tier="host") == 20


def test_engine_figures_only_for_shards_that_report_them(families):
    for name in ("mosaic_engine_utilization", "mosaic_step_tokens", "mosaic_first_tokens", "mosaic_clusters",
                 "mosaic_retrieval_bytes", "mosaic_kv_cache_usage_perc", "mosaic_stream_ingest_lag_seconds"):
        assert {s.labels["shard"] for s in families[name].samples} == {"a"}, name
    assert {s.labels["shard"] for s in families["mosaic_frames"].samples} == {"a", "b"}


def test_histogram_buckets_are_cumulative_and_match_the_observations(families):
    ttft = families["mosaic_time_to_first_token_seconds"]
    buckets = [(s.labels["le"], s.value) for s in ttft.samples if s.name.endswith("_bucket") and s.labels["shard"] == "a"]
    assert buckets == [("0.01", 0), ("0.05", 2), ("0.5", 4), ("1.0", 4), ("+Inf", 5)]
    count = [s.value for s in ttft.samples if s.name.endswith("_count") and s.labels["shard"] == "a"]
    total = [s.value for s in ttft.samples if s.name.endswith("_sum") and s.labels["shard"] == "a"]
    assert count == [len(TTFTS)] and total == [pytest.approx(sum(TTFTS))]
    e2e = families["mosaic_e2e_request_latency_seconds"]
    assert all(s.value == 0 for s in e2e.samples)  # nothing answered: every bucket, sum and count 0


def test_the_page_is_prometheus_text():
    assert CONTENT_TYPE_LATEST.startswith("text/plain")
    assert render([]) == b""
