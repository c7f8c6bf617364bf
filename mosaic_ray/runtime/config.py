"""Typed configuration of the Ray runtime: which engine each shard builds, how shards, the router
and migrations behave.

These are pydantic models because they cross the Serve boundary: they are read from YAML
(`cluster_configs/*.yaml`, Serve's `args:`), passed to actors as plain dicts and re-validated there,
so a bad file fails when the app starts, naming the field. Inside the engine, configs are the
dataclasses of `mosaic_ray.config`.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from mosaic_ray.config_model import ConfigModel
from mosaic_ray.engine.interface import Engine

# The real engine; it is constructed from the `kwargs` of `EngineSpec`.
DEFAULT_ENGINE_FACTORY = "mosaic_ray.engine.stream_engine:StreamEngine.from_spec"

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class EngineSpec(ConfigModel):
    """How a shard builds its engine: `factory(**kwargs)` must return an `Engine`.

    The factory is named by an importable path, not passed as an object, so the spec is plain
    data: it travels to a shard actor on any node and can be written in YAML. Tests name a fake.
    """

    factory: str = Field(DEFAULT_ENGINE_FACTORY, description="'package.module:attr[.attr]' returning an Engine")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str) -> str:
        if not _FACTORY_RE.match(value):
            raise ValueError(f"factory must look like 'package.module:attr', got {value!r}")
        return value

    def build(self) -> Engine:
        module_name, _, attr_path = self.factory.partition(":")
        target: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            target = getattr(target, attr)
        engine = target(**self.kwargs)
        if not isinstance(engine, Engine):
            raise TypeError(f"{self.factory} returned {type(engine).__name__}, not an Engine")
        return engine


class ShardSpec(ConfigModel):
    """One shard actor: its Ray resources, admission limits and metrics."""

    # One GPU per shard: a shard owns its GPU's memory and its streams. Tests give logical GPUs (`ray.init(num_gpus=N)`).
    num_gpus: float = Field(1.0, ge=0)
    # The engine thread is busy while the GPU works; the actor loop needs little besides.
    num_cpus: float = Field(1.0, ge=0)
    # 0: a dead shard stays dead; its streams are recovered elsewhere by replay (issue 9), never
    # by a silently empty restart that would answer 404 for streams the router maps to it.
    max_restarts: int = Field(0, ge=-1)
    # Frames queued on the shard but not yet in the engine. Beyond this, ingest answers 503 with
    # Retry-After. 256 frames is ~10 s of 8 streams at 3 fps: enough to absorb a question's pause.
    max_pending_frames: int = Field(256, ge=1)
    # A new stream is refused (503 + Retry-After; the router tries the next shard) when the
    # engine's measured busy share, scaled by (streams + 1) / streams, would pass this
    # (`runtime/capacity.py`). None (the default, for CPU demos and tests, where a small model
    # keeps the engine busy all the time): admit by the other limits only. GPU configs set 0.9.
    max_utilization: float | None = Field(None, gt=0, le=1)
    # The window the engine's busy share is measured over (seconds).
    capacity_window_s: float = Field(30.0, gt=0)
    # Frames queued for one stream (beyond the batch the engine is taking): half the shard's
    # queue, so one flooding stream cannot take all of it; ~40 s of a 3 fps stream.
    max_stream_pending_frames: int = Field(128, ge=1)
    # Requests of one stream admitted or held at once (frames, text, questions, info). A client
    # has a few in flight (a batch window, a question); more is a flood that would only wait on
    # the stream's lock, holding memory: 503 + Retry-After instead.
    max_stream_requests: int = Field(64, ge=1)
    # Frames of one stream coalesced into one append (bounds one call's memory and latency).
    max_coalesce_frames: int = Field(64, ge=1)
    # Threads decoding JPEG/PNG frames on the shard (PIL releases the GIL): ~1 ms per 224x224
    # JPEG on one core (measured, examples/measure_serve_overhead.py), so 4 keep up with ~4000 fps.
    decode_threads: int = Field(4, ge=1)
    # Requests for a stream held while it migrates wait at most this long, then get 503.
    hold_timeout_s: float = Field(60.0, gt=0)
    # A shard not ready after this long fails the runtime's start with an error naming the
    # resources it waits for (a cluster without the GPUs/CPUs asked would otherwise hang). Loading
    # a 7B checkpoint from local disk is the slow part: the default leaves it ample time.
    start_timeout_s: float = Field(600.0, gt=0)
    # A health check whose engine probe takes longer fails (a hung engine is a broken engine).
    health_timeout_s: float = Field(10.0, gt=0)
    # Time constant of the exponentially decaying ingest/query rates reported as load.
    rate_window_s: float = Field(10.0, gt=0)
    # Time-to-first-token histogram buckets (seconds), Prometheus style; spans the measured
    # measured 46 ms (16k tokens) to 694 ms (524k tokens) with room on both sides.
    ttft_buckets_s: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    # Streams remembered as "moved to shard X" after they leave, so stale routes get redirected.
    moved_memory: int = Field(10_000, ge=0)


class MigrationSpec(ConfigModel):
    """Moving a whole stream between shards (`mosaic_ray.runtime.migration`)."""

    # auto: torch.distributed (NCCL for CUDA tensors, gloo for host tensors), falling back to Ray's
    # object store when the group cannot form; or force one path.
    transport: Literal["auto", "distributed", "object_store"] = "auto"
    # Compare a fingerprint of every tensor on both sides (migration.fingerprint); a mismatch aborts the move (the source keeps
    # the stream). Costs one read of the state on each side.
    verify: bool = True
    # Rendezvous and transfer deadline of the distributed path.
    timeout_s: float = Field(60.0, gt=0)
    # Address the target dials for the distributed rendezvous (the source's store); None: the
    # source node's IP as Ray knows it. Set it to pick one network of a host with several.
    rendezvous_host: str | None = None
    # A source whose move is neither finished nor aborted this long (its router died mid-move)
    # thaws and serves the stream again. Longer than any move; a restarted router reconciles sooner.
    abandon_after_s: float = Field(300.0, gt=0)


class DurabilitySpec(ConfigModel):
    """Per-stream frame logs (`runtime/frame_log.py`): what is acknowledged survives a shard.

    A frame batch or text append is acknowledged only after its record is in the stream's log;
    a dead shard's streams are rebuilt on live shards by replaying their logs, and a restarted
    runtime finds its streams there. See docs/reliability.md.
    """

    # Off: acknowledgements wait for the engine only, and a dead shard's streams are lost.
    enabled: bool = True
    # "disk" (one file per stream under `root`), "memory" (tests: one process only), or
    # "package.module:attr" called as attr(spec, runtime_name) and returning a FrameLog.
    store: str = "disk"
    # Directory of the logs (`<root>/<runtime name>/<stream>.log`); None: $MOSAIC_RAY_LOG_DIR,
    # else ~/.mosaic_ray/log (`mosaic-ray serve` on a private cluster fills in `<that>/port-<http
    # port>`: one directory per server on a host, locked by `runtime/log_dir_lock.py`). With
    # several nodes it must be storage every node reaches (NFS...).
    root: str | None = None
    # always: fsync before each acknowledgement (survives power loss); interval: a thread fsyncs
    # every `fsync_interval_ms` (an OS crash loses at most that much); never: the OS decides.
    # A killed shard process loses nothing under any policy (the page cache outlives it).
    fsync: Literal["always", "interval", "never"] = "interval"
    # 100 ms: an OS crash may lose the last 0.1 s of acknowledgements; the fsync thread costs
    # ~10 syscalls/s per busy stream.
    fsync_interval_ms: int = Field(100, ge=1, le=60_000)
    # Log files a shard keeps open (one per stream it writes); beyond, the least recently written
    # is fsynced and closed. 512 fits Linux's default 1024 descriptors with room for sockets.
    max_open_files: int = Field(512, ge=1)
    # Frames of one stream replayed in one engine call when a stream is rebuilt (as ingest's
    # `max_coalesce_frames`; replays of different streams still meet in one step of the engine's loop).
    replay_batch_frames: int = Field(64, ge=1)
    # Streams a router rebuilds at once after a shard dies.
    replay_parallel_streams: int = Field(16, ge=1)
    # A shard whose engine broke or hangs (its health check raises: a lost GPU, a CUDA error) is
    # killed and its streams rebuilt elsewhere, like a dead shard's. Off by default: a broken
    # engine is kept for an operator to inspect, and a busy engine that misses health_timeout_s
    # would be replaced too.
    replace_broken_shards: bool = False
    # Retry-After of the 503 answered for a stream while it is rebuilt.
    recovering_retry_after_s: float = Field(2.0, gt=0)
    # A stream's engine state is snapshotted every this many acknowledged frames (a base, after
    # which its log is compacted to the records after it, or a delta: `snapshot_max_deltas`;
    # `runtime/snapshots.py`); a rebuild imports the snapshot and replays only the tail. 0: never (rebuilds replay whole logs, which grow forever).
    # 600 = 10 min of 1-fps video: a tail of at most 600 frames replays in ~22 s alone on an H100
    # (27 frames/s prefill measured on an H200), inside the 30 s recovery goal; more often costs a snapshot
    # write (the stream's KV bytes) each time.
    snapshot_every_frames: int = Field(600, ge=0)
    # A base (a whole snapshot) costs the stream's KV bytes once more where the engine keeps them
    # (the export's copies), plus one 8 MiB chunk: it is streamed to disk and read back chunk by
    # chunk (`runtime/snapshot_codec.py`), and written whole each time. A stream whose KV (host +
    # device) is larger gets no base: without one its log stays whole and a rebuild replays it
    # all. 64 GiB is about 2.3 hours of a 7B-shaped stream (~28 GiB of KV per hour, on the GPU
    # under `full`, in the host pool under `cluster`); lower it when the host cannot spare the
    # copy, or the disk the writes. 0: no limit. It bounds bases: a delta carries what changed.
    snapshot_max_bytes: int = Field(64 << 30, ge=0)
    # Incremental snapshots (`runtime/snapshots.py`): after a base (the whole stream), up to this
    # many deltas (only the host-pool slabs changed since the snapshot before) before the next
    # base. 0: every snapshot whole. The log keeps every record since the base, so a damaged delta
    # costs a longer replay, not data: 8 bounds that log at 9 cadences (5400 frames, ~68 MB of
    # 12.5 KB JPEGs), the delta files at 8 and a rebuild's reads at base + 8 parts. A stream over
    # `snapshot_max_bytes` gets no new base: its chain goes on past this bound.
    snapshot_max_deltas: int = Field(8, ge=0)
    # ...and a base is written again once the deltas since it add up to more than this share of its
    # bytes: past that, a rebuild reads more than a fresh base would hold (1.0: twice). On the tiny
    # model a delta after 2 of 26 frames was 13% of the base (tests/engine/test_snapshot_delta.py).
    snapshot_rebase_ratio: float = Field(1.0, gt=0)

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value not in ("disk", "memory") and not _FACTORY_RE.match(value):
            raise ValueError(f"store must be 'disk', 'memory' or 'package.module:attr', got {value!r}")
        return value


class LoadWeights(ConfigModel):
    """Weights of a shard's load score (`mosaic_ray.runtime.load`).

    Not yet measured on the real engine. Chosen so one unit = one idle stream: a 1-hour stream of a
    7B model at 1 fps holds ~29 GiB of KV (56 KB/token, 524k tokens), so 1/29 per GiB
    makes it count double; a stream ingesting 1 frame/s adds 0.5; a question per second adds 1.
    """

    stream: float = Field(1.0, ge=0)
    kv_gib: float = Field(1.0 / 29.0, ge=0)
    ingest_fps: float = Field(0.5, ge=0)
    queries_per_s: float = Field(1.0, ge=0)
    pending_frames: float = Field(0.01, ge=0)


class RouterSpec(ConfigModel):
    """Placement, persistence of the stream->shard map, and rebalancing."""

    # Rebalance when the heaviest shard's score exceeds skew_ratio x the lightest's.
    skew_ratio: float = Field(1.5, ge=1.0)
    # Scores below this count as this much when testing skew (an idle shard is not infinitely
    # lighter than a shard with one stream).
    min_score: float = Field(1.0, gt=0)
    # Seconds between automatic rebalancing rounds; 0 turns the loop off (call `rebalance`).
    rebalance_interval_s: float = Field(0.0, ge=0)
    max_migrations_per_round: int = Field(4, ge=1)
    # Seconds between shard health probes of the router's own loop; 0 turns it off.
    health_interval_s: float = Field(10.0, ge=0)
    # Load reports are reused this long when placing streams: one round of RPCs per second, not
    # per new stream. Streams placed meanwhile are counted by the router itself.
    load_cache_s: float = Field(1.0, ge=0)
    # Where the stream->shard map lives: "ray_kv" (Ray's GCS key-value store: survives router
    # restarts) or "file:/path/map.json" (also survives a whole-cluster restart).
    state_store: str = "ray_kv"
    weights: LoadWeights = Field(default_factory=LoadWeights)

    @field_validator("state_store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value != "ray_kv" and not value.startswith("file:"):
            raise ValueError(f"state_store must be 'ray_kv' or 'file:/path', got {value!r}")
        return value


class RuntimeConfig(ConfigModel):
    """Everything the runtime (router + shards) needs; one per Serve application."""

    # Prefix of the runtime's named actors (`<name>:router`, `<name>:shard:<i>`) and state keys:
    # two apps with different names never share streams.
    name: str = Field("mosaic", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    namespace: str = Field("mosaic_ray", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    num_shards: int = Field(1, ge=1, le=4096)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    shard: ShardSpec = Field(default_factory=ShardSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    migration: MigrationSpec = Field(default_factory=MigrationSpec)
    durability: DurabilitySpec = Field(default_factory=DurabilitySpec)

    @property
    def router_name(self) -> str:
        return f"{self.name}:router"

    def shard_name(self, index: int) -> str:
        return f"{self.name}:shard:{index}"

    @property
    def shard_names(self) -> list[str]:
        return [self.shard_name(i) for i in range(self.num_shards)]
