"""What a StreamEngine reports: one stream's info and the engine's stats (plain data for the
shard's load reports, `/metrics` and `stream_info`). Reads only; changes nothing."""

from __future__ import annotations

import time
from typing import Any

import torch

from mosaic_ray.engine.frame_pruner import options_of
from mosaic_ray.engine.stream_state import StreamState


def ingest_lag_s(state: StreamState, now: float) -> float:
    """How long the stream's oldest waiting frame has waited (0 when none waits)."""
    return now - state.oldest_waiting if state.deferred else 0.0


def stream_info(engine, s: StreamState) -> dict[str, Any]:
    """`engine`: the StreamEngine that owns `s` (which calls this; no import back up)."""
    return {
        "id": s.stream_id, "frames": s.frames, "texts": s.texts, "questions": s.questions,
        "tokens": s.tokens, "duration_s": s.clock, "resident_tokens": s.cache.resident_tokens,
        "past_tokens": s.cache.past_tokens, "staged_tokens": s.cache.staged_tokens, "kv_bytes_device": s.cache.device_bytes(),
        "kv_bytes_host": s.cache.host_bytes(), "retrieval": engine.config.cache.retrieval,
        "busy": s.busy, "deferred_frames": s.waiting_frames, "ingest_lag_s": ingest_lag_s(s, time.monotonic()),
        "frames_pruned": s.pruning.pruned, "frames_seen": s.frames + s.pruning.pruned, **options_of(s.pruning),
    }


def engine_stats(engine) -> dict[str, Any]:
    streams, now = engine.streams.values(), time.monotonic()
    return {
        "streams": len(engine.streams), "model": engine.config.model, "device": str(engine.device),
        "retrieval": engine.config.cache.retrieval,
        "kv_bytes_device": sum(s.cache.device_bytes() for s in streams),
        "kv_bytes_host": sum(s.cache.host_bytes() for s in streams),
        "pool_capacity_bytes": engine.pool.capacity_bytes, "pool_used_bytes": engine.pool.used_bytes,
        "kv_pool_capacity_bytes": engine.kv_pool.capacity_bytes,
        "kv_pool_used_bytes": engine.kv_pool.used_slots * engine.kv_pool.slot_bytes,
        "active_questions": len(engine._runs), "busy_s_total": engine.busy_s,
        "ingest_lag_s_max": max((ingest_lag_s(s, now) for s in streams), default=0.0),
        "ingest_lag_s_by_stream": {s.stream_id: ingest_lag_s(s, now) for s in streams},
        **{f"{k}_total": v for k, v in engine.counters.items()},
        **{f"step_{k}_total": v for k, v in engine.loop.counters.items()},
        "ttft_parts": engine.loop.ttft_parts(),
        **device_counts(engine, streams),
    }


def device_counts(engine, streams) -> dict[str, int]:
    """The figures kept on the device, read in one host sync: what the questions' retrievals moved
    (`StreamEngine.retrieval`) and, for cluster retrieval, the clusters in use over every stream's
    index (each (layer, KV head) group's counted)."""
    parts = [engine.retrieval]
    if engine.config.cache.retrieval == "cluster":
        counts = [ix.num_clusters.sum() for s in streams if (ix := getattr(s.cache.retriever, "index", None)) is not None]
        parts.append(torch.stack(counts).sum()[None] if counts else torch.zeros(1, dtype=torch.int64, device=engine.device))
    values = torch.cat([p.to(engine.retrieval.device, torch.int64) for p in parts]).tolist()
    out = dict(zip(("retrieval_tokens_total", "retrieval_copies_total", "retrieval_bytes_total"), values))
    if len(values) > 3:
        out["clusters"] = values[3]
    return out
