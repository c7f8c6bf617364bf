"""Engine specs and runtime configs of the scaling benchmarks: one retrieval method per runtime."""

from __future__ import annotations

from typing import Any

METHODS = ("full", "frame", "token", "cluster")


def engine_kwargs(method: str, model: str, device: str, window: int, pool_mb: int) -> dict[str, Any]:
    """Kwargs of the default factory (`StreamEngine.from_spec`) for one retrieval method."""
    return {"model": model, "device": device,
            "cache": {"retrieval": method, "window_tokens": window, "sink_tokens": 4 if window < 256 else 16,
                      "pool": {"capacity_bytes": pool_mb << 20}}}


def runtime_config(name: str, num_shards: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A RuntimeConfig dict: one (logical) GPU per shard, no CPU reserved (the engine thread is the
    shard's work), no periodic health probes (they would add load to the measurement)."""
    return {"name": name, "num_shards": num_shards, "engine": {"kwargs": kwargs},
            "shard": {"num_gpus": 1, "num_cpus": 0, "max_pending_frames": 1024},
            "router": {"health_interval_s": 0}}
