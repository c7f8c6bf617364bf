"""/metrics of a shard on the tiny real engine (CPU, no Ray): answering a question moves the
token counters and the latency histograms; a streamed answer closed early counts as cancelled;
the engine's own figures (pools, retrieval, clusters, frames ingested) are on the page."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from mosaic_ray.runtime.actors.shard import ShardActor
from mosaic_ray.serve.metrics import render
from tests.runtime.shard_fixtures import stop_local

ENGINE = {"factory": "mosaic_ray.engine.stream_engine:StreamEngine.from_spec",
          "kwargs": {"model": "tiny", "device": "cpu", "kv_pool": {"capacity_tokens": 1 << 14},
                     # a small window: past tokens leave it, so the question retrieves clusters from the pool
                     "cache": {"retrieval": "cluster", "window_tokens": 32, "sink_tokens": 4, "offload_batch": 16,
                               "pool": {"capacity_bytes": 16 << 20}}}}
FRAMES = 6


def _figures(snapshot: dict) -> dict[str, float]:
    """{sample name + labels but shard: value} of the shard's page."""
    out = {}
    for family in text_string_to_metric_families(render([snapshot]).decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "shard")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_answers_move_the_token_counters_and_latency_histograms():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(FRAMES)]

    async def go():
        shard = ShardActor.__ray_actor_class__("metrics:shard:0", ENGINE, {"num_gpus": 0, "num_cpus": 0}, {},
                                               {"enabled": False}, "metrics")
        try:
            await shard.open_stream("a")
            await shard.append_frames("a", None, frames, [float(i) for i in range(FRAMES)])
            before = _figures(await shard.metrics())
            answer = await shard.answer("a", {"question": "what happened?", "max_tokens": 4})
            after = _figures(await shard.metrics())
            asking = shard.ask("a", {"question": "and then?", "max_tokens": 8})
            await asking.__anext__()  # the first delta, then the asker goes away
            await asking.aclose()
            closed = _figures(await shard.metrics())
            while (await shard._call(lambda: shard._engine.loop.active)):  # the closed answer's steps end
                await asyncio.sleep(0.05)
            return answer, before, after, closed
        finally:
            stop_local(shard)

    answer, before, after, closed = asyncio.run(go())
    usage = answer["usage"]
    assert after["mosaic_prompt_tokens_total"] - before["mosaic_prompt_tokens_total"] == usage["prompt_tokens"] > 0
    assert after["mosaic_generation_tokens_total"] - before["mosaic_generation_tokens_total"] == 4
    for h in ("mosaic_e2e_request_latency_seconds", "mosaic_time_to_first_token_seconds",
              "mosaic_request_time_per_output_token_seconds"):
        assert after[f"{h}_count"] == before[f"{h}_count"] + 1, h
        assert after[f"{h}_bucket{{le=+Inf}}"] == after[f"{h}_count"], h
    reason = f"mosaic_request_success_total{{finished_reason={answer['finish_reason']}}}"
    assert after[reason] == before[reason] + 1
    assert after["mosaic_num_requests_running"] == after["mosaic_num_requests_waiting"] == 0
    assert after["mosaic_frames_ingested_total"] == after["mosaic_frames_total"] == FRAMES
    assert after["mosaic_retrieval_bytes_total"] > 0 and after["mosaic_retrieval_copies_total"] > 0
    assert after["mosaic_clusters"] > 0
    assert 0 < after["mosaic_host_pool_used_bytes"] <= after["mosaic_host_pool_capacity_bytes"]
    assert 0 < after["mosaic_kv_cache_usage_perc"] < 1
    # the streamed answer closed after its first delta: cancelled, no e2e observed, nothing left running
    assert closed["mosaic_request_success_total{finished_reason=cancelled}"] == 1
    assert closed["mosaic_e2e_request_latency_seconds_count"] == after["mosaic_e2e_request_latency_seconds_count"]
    assert closed["mosaic_num_requests_running"] == 0
