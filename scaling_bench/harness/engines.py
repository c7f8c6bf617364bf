"""Engine specs and runtime configs of the scaling benchmarks: one retrieval method per runtime."""

from __future__ import annotations

import uuid
from typing import Any

METHODS = ("full", "frame", "token", "cluster")

# Appended to every runtime name a benchmark process starts. A runtime's frame logs and stream map
# are keyed by its name (`<log root>/<name>/`); a run that was killed before it dropped its runtime
# leaves them behind, and the next run of the same name would rebuild those streams at start
# (then refuse to create them: "stream exists"). One id per process keeps runs apart.
RUN_ID = uuid.uuid4().hex[:8]


def engine_kwargs(method: str, model: str, device: str, window: int, pool_mb: int) -> dict[str, Any]:
    """Kwargs of the default factory (`StreamEngine.from_spec`) for one retrieval method."""
    return {"model": model, "device": device,
            "cache": {"retrieval": method, "window_tokens": window, "sink_tokens": 4 if window < 256 else 16,
                      "pool": {"capacity_bytes": pool_mb << 20}}}


def runtime_config(name: str, num_shards: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A RuntimeConfig dict: one (logical) GPU per shard, no CPU reserved (the engine thread is the
    shard's work), no periodic health probes (they would add load to the measurement). The name
    gets this process's `RUN_ID`, so no earlier run's logs are found."""
    return {"name": f"{name}-{RUN_ID}", "num_shards": num_shards, "engine": {"kwargs": kwargs},
            "shard": {"num_gpus": 1, "num_cpus": 0, "max_pending_frames": 1024},
            "router": {"health_interval_s": 0}}
