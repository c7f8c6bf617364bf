"""Prometheus text exposition of every shard's figures (`ShardActor.metrics` snapshots).

Shards count; any ingress replica renders all of them, so one scrape of /metrics sees the whole
runtime whichever replica answers. Rates (`*_per_second`) are the shards' own decaying rates, the
numbers the router places by; counters let Prometheus compute its own.
"""

from __future__ import annotations

from typing import Any

# name, type, help, snapshot key
_SIMPLE = [
    ("mosaic_frames_total", "counter", "Frames appended to streams.", "frames_total"),
    ("mosaic_ingest_frames_per_second", "gauge", "Recent ingest rate (decaying average).", "ingest_fps"),
    ("mosaic_queries_total", "counter", "Questions answered or started.", "queries_total"),
    ("mosaic_queries_per_second", "gauge", "Recent question rate (decaying average).", "queries_per_s"),
    ("mosaic_streams", "gauge", "Streams held by the shard.", "streams"),
    ("mosaic_pending_frames", "gauge", "Frames queued on the shard, not yet in the engine.", "pending_frames"),
    ("mosaic_active_queries", "gauge", "Questions being answered.", "active_queries"),
    ("mosaic_engine_errors_total", "counter", "Engine failures (not request errors).", "errors_total"),
    ("mosaic_migrations_in_total", "counter", "Streams received from other shards.", "migrations_in"),
    ("mosaic_migrations_out_total", "counter", "Streams moved to other shards.", "migrations_out"),
    ("mosaic_shard_healthy", "gauge", "1 when the shard's engine is healthy.", "healthy"),
]


# figures only engines that measure them report (StreamEngine): rendered for the shards that have them
_OPTIONAL = [
    ("mosaic_engine_busy_seconds_total", "counter", "Seconds the engine spent working.", "busy_s_total"),
    ("mosaic_engine_utilization", "gauge", "Busy share of the engine over the capacity window.", "engine_utilization"),
    ("mosaic_ingest_lag_seconds_max", "gauge", "Age of the oldest frame waiting for ingest, over the shard's streams.",
     "ingest_lag_s_max"),
    ("mosaic_engine_steps_total", "counter", "Scheduled engine steps.", "step_steps_total"),
]
_STEP_TOKENS = ("decode", "prefill", "ingest")
_STEP_PARTS = ("question", "ingest", "maintenance")  # the step loop's `*_s` counters
_TTFT_PARTS = ("start", "queue", "prefill")  # the step loop's `ttft_*_s` counters


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def render(shards: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, kind, help_text, key in _SIMPLE:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for s in shards:
            lines.append(f'{name}{{shard="{_label(s["shard"])}"}} {_num(s[key])}')
    for name, kind, help_text, key in _OPTIONAL:
        having = [x for x in shards if key in x]
        if having:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{shard="{_label(x["shard"])}"}} {_num(x[key])}' for x in having]
    having = [x for x in shards if "step_decode_tokens_total" in x]
    if having:
        lines += ["# HELP mosaic_step_tokens_total Decoder tokens of scheduled steps, by kind (the step mix).",
                  "# TYPE mosaic_step_tokens_total counter"]
        for x in having:
            for kind in _STEP_TOKENS:
                lines.append(f'mosaic_step_tokens_total{{shard="{_label(x["shard"])}",kind="{kind}"}} '
                             f'{_num(x[f"step_{kind}_tokens_total"])}')
        lines += ["# HELP mosaic_step_seconds_total Wall seconds of the step loop, by part (question steps, "
                  "ingest forwards, upkeep: offloads and splits).", "# TYPE mosaic_step_seconds_total counter"]
        for x in having:
            for kind in _STEP_PARTS:
                lines.append(f'mosaic_step_seconds_total{{shard="{_label(x["shard"])}",kind="{kind}"}} '
                             f'{_num(float(x[f"step_{kind}_s_total"]))}')
        lines += ["# HELP mosaic_ttft_part_seconds_total A question's time to its first token in the engine, by part "
                  "(start: the stream's waiting frames ingested first; queue: the wait for a step; prefill: the step "
                  "that fed the prompt), summed over mosaic_first_tokens_total questions.",
                  "# TYPE mosaic_ttft_part_seconds_total counter"]
        for x in having:
            for kind in _TTFT_PARTS:
                lines.append(f'mosaic_ttft_part_seconds_total{{shard="{_label(x["shard"])}",kind="{kind}"}} '
                             f'{_num(float(x.get(f"step_ttft_{kind}_s_total", 0.0)))}')
        lines += ["# HELP mosaic_first_tokens_total Questions whose first token the engine produced.",
                  "# TYPE mosaic_first_tokens_total counter"]
        lines += [f'mosaic_first_tokens_total{{shard="{_label(x["shard"])}"}} {_num(x.get("step_first_tokens_total", 0))}'
                  for x in having]
    having = [x for x in shards if "ingest_lag_s_by_stream" in x]
    if having:
        lines += ["# HELP mosaic_stream_ingest_lag_seconds Age of the stream's oldest frame waiting for ingest (0: none waits).",
                  "# TYPE mosaic_stream_ingest_lag_seconds gauge"]
        for x in having:
            for sid, lag in sorted(x["ingest_lag_s_by_stream"].items()):
                lines.append(f'mosaic_stream_ingest_lag_seconds{{shard="{_label(x["shard"])}",stream="{_label(sid)}"}} '
                             f'{_num(float(lag))}')
    lines += ["# HELP mosaic_kv_bytes KV cache bytes held, by tier.", "# TYPE mosaic_kv_bytes gauge"]
    for s in shards:
        for tier in ("device", "host"):
            lines.append(f'mosaic_kv_bytes{{shard="{_label(s["shard"])}",tier="{tier}"}} {_num(s[f"kv_bytes_{tier}"])}')
    lines += [
        "# HELP mosaic_ttft_seconds Time from a question reaching its shard to its first delta.",
        "# TYPE mosaic_ttft_seconds histogram",
    ]
    for s in shards:
        h, shard = s["ttft_s"], _label(s["shard"])
        for bound, count in zip(h["bounds"], h["counts"]):
            lines.append(f'mosaic_ttft_seconds_bucket{{shard="{shard}",le="{bound}"}} {count}')
        lines.append(f'mosaic_ttft_seconds_bucket{{shard="{shard}",le="+Inf"}} {h["count"]}')
        lines.append(f'mosaic_ttft_seconds_sum{{shard="{shard}"}} {_num(float(h["sum"]))}')
        lines.append(f'mosaic_ttft_seconds_count{{shard="{shard}"}} {h["count"]}')
    return "\n".join(lines) + "\n"
