"""Ray for a benchmark script: join the cluster a `ray job submit` (or RAY_ADDRESS) points at, else
start a quiet private one in this process.

A joined cluster is checked first (`require_resources`): a run it cannot place exits at once with
one line naming what is missing, instead of waiting forever on actors Ray cannot schedule. A
private cluster is given exactly what the run needs (logical GPUs on a CPU machine).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

    def close(self, keep_logs: str | None = None) -> None:
        """Stop a private Ray; `keep_logs`: copy its session's logs (every actor's stdout and
        stderr, where the shards and the router log) into that folder first."""
        import ray

        if keep_logs and self.tmp:
            shutil.copytree(Path(self.tmp) / "session_latest" / "logs", keep_logs, dirs_exist_ok=True,
                            ignore_dangling_symlinks=True)
        if self.private:
            ray.shutdown()
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)


def under_cluster() -> bool:
    """A Ray job's driver (or a shell with RAY_ADDRESS) joins that cluster."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def missing_resources(need: dict[str, float], total: dict[str, float],
                      free: dict[str, float] | None = None) -> str | None:
    """None when the cluster has every resource of `need` (in `total`, and free in `free` when
    given); else one line naming what is missing and what to do about it."""
    short = {k: v for k, v in need.items() if total.get(k, 0) < v}
    if short:
        has = ", ".join(f"{k} {total.get(k, 0):g} of the {v:g} needed" for k, v in short.items())
        if "GPU" in short:  # the shards: one GPU each
            fix = (f"one per shard: start Ray with them (on a CPU machine, logical ones: `ray start --head "
                   f"--num-gpus={short['GPU']:g}`), or run the script without `ray job submit`/RAY_ADDRESS "
                   "(a private cluster with logical GPUs)")
        else:
            fix = "start Ray with more (`ray start --head --num-cpus=N`)"
        return f"the Ray cluster has {has}; {fix}; or ask for fewer shards"
    busy = {k: v for k, v in need.items() if free is not None and free.get(k, 0) < v}
    if busy:
        has = ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}, {v:g} needed" for k, v in busy.items())
        return (f"the Ray cluster has {has}: other actors hold the rest (`ray list actors --filter state=ALIVE`); "
                "stop them (e.g. `serve shutdown`) or ask for fewer shards")
    return None


def require_resources(need: dict[str, float]) -> None:
    """Exit (status 1, one line on stderr) when the joined cluster cannot place `need`."""
    import ray

    problem = missing_resources(need, ray.cluster_resources(), ray.available_resources())
    if problem:
        raise SystemExit(f"error: {problem}")


def start_ray(num_gpus: int, num_cpus: int = 8) -> RaySession:
    """`num_gpus` logical GPUs for a private cluster (one per shard: shards fit on a CPU machine);
    a joined cluster must have `num_gpus` GPUs free (`require_resources`), or the script exits."""
    import ray

    if under_cluster():
        ray.init(address="auto", log_to_driver=False)
        try:
            require_resources({"GPU": num_gpus})
        except SystemExit:
            ray.shutdown()
            raise
        return RaySession(private=False)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Unix socket paths are limited
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=200 << 20, log_to_driver=False, _temp_dir=tmp)
    return RaySession(private=True, tmp=tmp)
