"""Prometheus exposition of every shard's figures (`ShardActor.metrics` snapshots), by prometheus_client.

Shards count; any ingress replica renders all of them, so one scrape of /metrics sees the whole
runtime whichever replica answers. Each scrape builds a fresh `CollectorRegistry` holding one
collector over that scrape's snapshots, so nothing is kept between scrapes and a shard that is gone
simply stops appearing.

Names: vLLM's metrics (`vllm:prompt_tokens_total`, `vllm:e2e_request_latency_seconds`, ...) under
our `mosaic_` prefix instead of `vllm:` (Prometheus reserves names with colons for recording
rules), so `vllm:X` is `mosaic_X`; then ours (frames, ingest lag, retrieval, clusters, pools, the
step loop). Every sample has the label `shard`. Counters end in `_total`, durations are in
`_seconds`, sizes in `_bytes`. Rates are Prometheus' to compute from the counters; the two shares
exported as gauges are the shard's own working figures: `mosaic_ingest_frames_per_second` (the
decaying rate its busy answers' retry hints use) and `mosaic_engine_utilization` (the busy share
its admission uses). A figure a shard's engine does not report (the fake engine measures no
steps, no pools) is left out for that shard, not exported as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE_LATEST", "render"]

Getter = Callable[[dict[str, Any]], Any]


def _key(key: str) -> Getter:
    return lambda s: s.get(key)


def _parts(prefix: str, kinds: tuple[str, ...], suffix: str) -> Getter:
    """{kind: s[prefix + kind + suffix]} for a shard whose engine reports the step loop, else None."""
    return lambda s: {k: s.get(f"{prefix}{k}{suffix}", 0) for k in kinds} if "step_steps_total" in s else None


def _kv_usage(s: dict[str, Any]) -> float | None:
    """vLLM's kv_cache_usage_perc (a fraction, 1 = full): the device KV pool's, else the host pool's."""
    for used, cap in (("kv_pool_used_bytes", "kv_pool_capacity_bytes"), ("pool_used_bytes", "pool_capacity_bytes")):
        if s.get(cap):
            return s[used] / s[cap]
    return None


# (name, type, help, extra label or None, getter): the getter gives None (not reported by the
# shard), a number, or, with an extra label, {label value: number}.
_FIGURES: list[tuple[str, str, str, str | None, Getter]] = [
    # vLLM's
    ("mosaic_prompt_tokens_total", "counter", "Prompt tokens of answered questions (the question's own prompt, "
     "not the stream's context).", None, _key("prompt_tokens_total")),
    ("mosaic_generation_tokens_total", "counter", "Tokens sampled for answered questions.", None,
     _key("generation_tokens_total")),
    ("mosaic_request_success_total", "counter", "Questions finished, by why they ended (stop, length, cancelled: "
     "the asker went away, error: the request failed).", "finished_reason", _key("finished_total")),
    ("mosaic_num_requests_running", "gauge", "Questions being answered (their stream's turn, in the engine).", None,
     _key("requests_running")),
    ("mosaic_num_requests_waiting", "gauge", "Questions admitted, waiting for their stream's turn.", None,
     _key("requests_waiting")),
    ("mosaic_kv_cache_usage_perc", "gauge", "KV cache usage as a fraction (1 = full, as vLLM's): the device KV "
     "pool's, or the host pool's for an engine without one.", None, _kv_usage),
    # the shard's
    ("mosaic_frames_total", "counter", "Frames the shard accepted for its streams.", None, _key("frames_total")),
    ("mosaic_ingest_frames_per_second", "gauge", "Recent accepted-frame rate (decaying average; the shard's "
     "retry hints use it).", None, _key("ingest_fps")),
    ("mosaic_queries_total", "counter", "Questions that reached the engine.", None, _key("queries_total")),
    ("mosaic_streams", "gauge", "Streams held by the shard.", None, _key("streams")),
    ("mosaic_pending_frames", "gauge", "Frames queued on the shard, not yet in the engine.", None,
     _key("pending_frames")),
    ("mosaic_engine_errors_total", "counter", "Engine failures (not request errors).", None, _key("errors_total")),
    ("mosaic_migrations_in_total", "counter", "Streams received from other shards.", None, _key("migrations_in")),
    ("mosaic_migrations_out_total", "counter", "Streams moved to other shards.", None, _key("migrations_out")),
    ("mosaic_shard_healthy", "gauge", "1 when the shard's engine is healthy.", None, _key("healthy")),
    ("mosaic_kv_bytes", "gauge", "KV cache bytes the streams hold, by tier.", "tier",
     lambda s: {"device": s["kv_bytes_device"], "host": s["kv_bytes_host"]}),
    # the engine's (StreamEngine)
    ("mosaic_frames_ingested_total", "counter", "Frames through the engine's model into the streams' caches.",
     None, _key("frames_ingested_total")),
    ("mosaic_ingest_lag_seconds_max", "gauge", "Age of the oldest frame waiting for ingest, over the shard's "
     "streams.", None, _key("ingest_lag_s_max")),
    ("mosaic_stream_ingest_lag_seconds", "gauge", "Age of the stream's oldest frame waiting for ingest "
     "(0: none waits).", "stream", _key("ingest_lag_s_by_stream")),
    ("mosaic_retrieval_bytes_total", "counter", "Bytes questions' retrievals copied from the host pool.", None,
     _key("retrieval_bytes_total")),
    ("mosaic_retrieval_copies_total", "counter", "Contiguous host-pool reads (copies) of questions' retrievals.",
     None, _key("retrieval_copies_total")),
    ("mosaic_retrieval_tokens_total", "counter", "Past tokens questions' retrievals selected, summed over layers.",
     None, _key("retrieval_tokens_total")),
    ("mosaic_clusters", "gauge", "Retrieval clusters in use over the streams, every (layer, KV head) group's.",
     None, _key("clusters")),
    ("mosaic_host_pool_used_bytes", "gauge", "Host pool bytes in use.", None, _key("pool_used_bytes")),
    ("mosaic_host_pool_capacity_bytes", "gauge", "Host pool capacity.", None, _key("pool_capacity_bytes")),
    ("mosaic_device_kv_pool_used_bytes", "gauge", "Device KV pool bytes in use.", None, _key("kv_pool_used_bytes")),
    ("mosaic_device_kv_pool_capacity_bytes", "gauge", "Device KV pool capacity.", None,
     _key("kv_pool_capacity_bytes")),
    ("mosaic_engine_busy_seconds_total", "counter", "Seconds the engine spent working.", None, _key("busy_s_total")),
    ("mosaic_engine_utilization", "gauge", "Busy share of the engine over the capacity window (admission's).",
     None, _key("engine_utilization")),
    ("mosaic_engine_steps_total", "counter", "Scheduled engine steps.", None, _key("step_steps_total")),
    ("mosaic_step_tokens_total", "counter", "Decoder tokens of scheduled steps, by kind (the step mix).", "kind",
     _parts("step_", ("decode", "prefill", "ingest"), "_tokens_total")),
    ("mosaic_step_seconds_total", "counter", "Wall seconds of the step loop, by part (question steps, ingest "
     "forwards, upkeep: offloads and splits).", "kind", _parts("step_", ("question", "ingest", "maintenance"),
                                                               "_s_total")),
    ("mosaic_ttft_part_seconds_total", "counter", "A question's time to its first token in the engine, by part "
     "(start: the stream's waiting frames ingested first; queue: the wait for a step; prefill: the step that fed "
     "the prompt), summed over mosaic_first_tokens_total questions.", "kind",
     _parts("step_ttft_", ("start", "queue", "prefill"), "_s_total")),
    ("mosaic_first_tokens_total", "counter", "Questions whose first token the engine produced.", None,
     lambda s: s.get("step_first_tokens_total", 0) if "step_steps_total" in s else None),
]

# (name, help, snapshot key of a `shard_metrics.Histogram` snapshot)
_HISTOGRAMS = [
    ("mosaic_time_to_first_token_seconds", "Time from a question's turn on its shard to its first text delta.",
     "ttft_s"),
    ("mosaic_e2e_request_latency_seconds", "Time from a question's turn on its shard to the end of its answer.",
     "e2e_s"),
    ("mosaic_request_time_per_output_token_seconds", "A question's decode time over its tokens after the first "
     "(answers of two or more tokens).", "tpot_s"),
]

_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


class ShardCollector:
    """Yields the metric families of one scrape's shard snapshots (a prometheus_client collector)."""

    def __init__(self, shards: list[dict[str, Any]]) -> None:
        self.shards = shards

    def collect(self) -> Iterator[Metric]:
        for name, kind, help_text, label, get in _FIGURES:
            family = _FAMILIES[kind](name, help_text, labels=["shard"] + ([label] if label else []))
            for s in self.shards:
                value = get(s)
                for extra, v in (sorted(value.items()) if label and value is not None else [(None, value)]):
                    if v is not None:
                        family.add_metric([s["shard"]] + ([extra] if label else []), float(v))
            if family.samples:
                yield family
        for name, help_text, key in _HISTOGRAMS:
            family = HistogramMetricFamily(name, help_text, labels=["shard"])
            for s in self.shards:
                if key in s:
                    h = s[key]
                    buckets = [(floatToGoString(b), c) for b, c in zip(h["bounds"], h["counts"])]
                    family.add_metric([s["shard"]], buckets + [("+Inf", h["count"])], h["sum"])
            if family.samples:
                yield family


def render(shards: list[dict[str, Any]]) -> bytes:
    """The Prometheus text page (`CONTENT_TYPE_LATEST`) of these shard snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShardCollector(shards))
    return generate_latest(registry)
