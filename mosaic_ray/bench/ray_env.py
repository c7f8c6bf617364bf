"""Ray for a benchmark script: join the cluster a `ray job submit` (or RAY_ADDRESS) points at, else
start a quiet private one in this process (FACTS.md "Ray in tests")."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_prestart_worker_first_driver": "0",
}


@dataclass
class RaySession:
    private: bool  # True: this process started Ray and stops it
    tmp: str | None = None

    def close(self) -> None:
        import ray

        if self.private:
            ray.shutdown()
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)


def under_cluster() -> bool:
    """A Ray job's driver (or a shell with RAY_ADDRESS) joins that cluster."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def start_ray(num_gpus: int, num_cpus: int = 8) -> RaySession:
    """`num_gpus` logical GPUs for a private cluster (one per shard: shards fit on a CPU machine)."""
    import ray

    if under_cluster():
        ray.init(address="auto", log_to_driver=False)
        return RaySession(private=False)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Unix socket paths are limited
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=200 << 20, log_to_driver=False, _temp_dir=tmp)
    return RaySession(private=True, tmp=tmp)
