"""The Prometheus page renders the engine figures only shards with a measuring engine report."""

from mosaic_ray.serve.metrics import render


def _shard(name, **extra):
    return {"shard": name, "frames_total": 1, "ingest_fps": 0.5, "queries_total": 2, "queries_per_s": 0.1,
            "streams": 1, "pending_frames": 0, "active_queries": 0, "errors_total": 0, "migrations_in": 0,
            "migrations_out": 0, "healthy": True, "kv_bytes_device": 10, "kv_bytes_host": 20,
            "ttft_s": {"bounds": [0.1], "counts": [1], "count": 1, "sum": 0.05}, **extra}


def test_engine_figures_and_step_mix():
    page = render([_shard("a", busy_s_total=3.5, engine_utilization=0.4, ingest_lag_s_max=0.25,
                          step_steps_total=9, step_decode_tokens_total=5, step_prefill_tokens_total=40,
                          step_ingest_tokens_total=600, step_question_s_total=1.5, step_ingest_s_total=0.5,
                          step_maintenance_s_total=0.25, step_ttft_start_s_total=0.75,
                          step_first_tokens_total=3, ingest_lag_s_by_stream={"cam-2": 0.25, "cam-1": 0.0}),
                   _shard("b")])
    assert 'mosaic_engine_utilization{shard="a"} 0.4' in page
    assert 'mosaic_ingest_lag_seconds_max{shard="a"} 0.25' in page
    assert 'mosaic_step_tokens_total{shard="a",kind="ingest"} 600' in page
    assert 'mosaic_engine_utilization{shard="b"}' not in page  # b's engine does not measure
    assert page.count("# TYPE mosaic_step_tokens_total counter") == 1
    assert 'mosaic_step_seconds_total{shard="a",kind="maintenance"} 0.25' in page
    assert 'mosaic_stream_ingest_lag_seconds{shard="a",stream="cam-2"} 0.25' in page
    assert 'mosaic_stream_ingest_lag_seconds{shard="a",stream="cam-1"} 0.0' in page
    assert 'stream_ingest_lag_seconds{shard="b"' not in page
    assert 'mosaic_ttft_part_seconds_total{shard="a",kind="start"} 0.75' in page
    assert 'mosaic_first_tokens_total{shard="a"} 3' in page
    assert 'mosaic_first_tokens_total{shard="b"}' not in page
