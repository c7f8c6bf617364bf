"""Typed configuration of the Ray runtime: which engine each shard builds, how shards, the router
and migrations behave.

Pydantic models: they are read from YAML (`cluster_configs/*.yaml`, Serve's `args:`), passed to
actors as plain dicts and re-validated there, so a bad file fails when the app starts, naming the
field. With the default factory, `engine.kwargs` is validated as the engine's own `EngineConfig`
(`mosaic_ray.config`, the same pydantic tree down to the cache) at the same time, and
`RuntimeConfig` checks the limits that must agree across shard, log and engine.
"""

from __future__ import annotations

import importlib
import re
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from mosaic_ray.config import EngineConfig
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
    kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "keyword arguments of the factory; for the default (the real engine) the fields of `EngineConfig`, "
        "checked when the config is read"))

    plain_models = {"kwargs": EngineConfig}  # with the default factory (`_real_engine_kwargs`)

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str) -> str:
        if not _FACTORY_RE.match(value):
            raise ValueError(f"factory must look like 'package.module:attr', got {value!r}")
        return value

    @field_validator("kwargs")
    @classmethod
    def _real_engine_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The default factory's kwargs are an `EngineConfig`: every wrong field is an error here,
        at its place (`engine.kwargs.cache.retreival`), not when a shard builds its engine."""
        if info.data.get("factory", DEFAULT_ENGINE_FACTORY) == DEFAULT_ENGINE_FACTORY:
            EngineConfig.model_validate(value)
        return value

    @cached_property
    def engine_config(self) -> EngineConfig | None:
        """The real engine's config (None for another factory, whose kwargs are its own)."""
        return EngineConfig.model_validate(self.kwargs) if self.factory == DEFAULT_ENGINE_FACTORY else None

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
    """One shard actor: its Ray resources, queue and admission limits, timers and
    metrics.

    A batch larger than a queue bound is taken when that queue is empty, so no batch is refused
    forever. Requests across a shard's streams are bounded upstream, by the ingress replicas'
    `max_ongoing_requests`.
    """

    num_gpus: float = Field(1.0, ge=0, description=(
        "GPUs of one shard actor: a shard owns its GPU's memory and its streams (tests give logical GPUs, "
        "`ray.init(num_gpus=N)`)"))
    num_cpus: float = Field(1.0, ge=0, description=(
        "CPUs of one shard actor: the engine thread is busy while the GPU works; the actor loop needs little "
        "besides"))
    # 0: its streams are recovered elsewhere by replay (issue 9), never by a silently empty restart
    # that would answer 404 for streams the router maps to it.
    max_restarts: int = Field(0, ge=-1, description=(
        "Ray restarts of a dead shard actor; 0: a dead shard stays dead and its streams are rebuilt "
        "elsewhere from their logs (-1: unlimited)"))
    max_pending_frames: int = Field(256, ge=1, description=(
        "frames queued on the shard but not yet in the engine, all streams: ~10 s of 8 streams at 3 fps, "
        "enough to absorb a question's pause; beyond, 503 `overloaded` with Retry-After = drain time at the "
        "recent rate (1-30 s)"))
    # None by default for CPU demos and tests, where a small model keeps the engine busy all the time.
    max_utilization: float | None = Field(None, gt=0, le=1, description=(
        "admission from measured capacity (`runtime/actors/capacity.py`): a new stream is refused (503 `overloaded`, "
        "Retry-After; the router tries the next shard) when the engine's busy share (forwards, sampling, "
        "commits and offloads; not cluster splits) over `capacity_window_s`, times (streams + 1) / streams, "
        "would pass it. None: admit by the other limits only (a CPU demo's engine is busy all the time); "
        "GPU configs (`single_node_multi_gpu.yaml`) set 0.9"))
    capacity_window_s: float = Field(30.0, gt=0, description=(
        "the window (seconds) the engine's busy share is measured over"))
    max_stream_pending_frames: int = Field(128, ge=1, description=(
        "frames queued for one stream (plus the batch the engine is taking, <= `max_coalesce_frames`): half "
        "the shard's queue, so one flooding stream cannot take it all; ~40 s of a 3 fps stream. At most "
        "`max_pending_frames`"))
    # A client has a few in flight (a batch window, a question); more is a flood that would only
    # wait on the stream's lock, holding memory.
    max_stream_requests: int = Field(64, ge=1, description=(
        "requests of one stream (frames, text, questions, info) admitted or held at once; more are refused "
        "(503, Retry-After 1 s) instead of waiting on the stream's lock"))
    max_coalesce_frames: int = Field(64, ge=1, description=(
        "frames of one stream coalesced into one engine append (bounds one call's memory and latency); at "
        "most the engine's `max_frames_per_call`"))
    # ~1 ms per 224x224 JPEG on one core (measured, examples/measure_serve_overhead.py).
    decode_threads: int = Field(4, ge=1, description=(
        "threads decoding JPEG/PNG frames on the shard (PIL releases the GIL): at ~1 ms a 224x224 JPEG, "
        "4 keep up with ~4000 fps"))
    hold_timeout_s: float = Field(60.0, gt=0, description=(
        "requests for a stream held while it migrates wait at most this long (seconds), then get 503"))
    # Loading a 7B checkpoint from local disk is the slow part: the default leaves it ample time.
    start_timeout_s: float = Field(600.0, gt=0, description=(
        "a shard not ready after this long (seconds) fails the runtime's start with an error naming the "
        "resources it waits for (a cluster without the GPUs / CPUs asked would otherwise hang)"))
    health_timeout_s: float = Field(10.0, gt=0, description=(
        "a health check whose engine probe takes longer (seconds) fails: a hung engine is a broken engine"))
    rate_window_s: float = Field(10.0, gt=0, description=(
        "time constant (seconds) of the exponentially decaying ingest / query rates reported as load"))
    ttft_buckets_s: tuple[float, ...] = Field(
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), description=(
        "time-to-first-token histogram buckets (seconds), Prometheus style; they span the measured 46 ms "
        "(16k tokens) to 694 ms (524k tokens) with room on both sides"))
    moved_memory: int = Field(10_000, ge=0, description=(
        "streams remembered as \"moved to shard X\" after they leave, so stale routes get redirected"))


class MigrationSpec(ConfigModel):
    """Moving a whole stream between shards (`mosaic_ray.runtime.actors.migration`): how its state travels,
    whether it is verified, and the deadlines of a move."""

    transport: Literal["auto", "distributed", "object_store"] = Field("auto", description=(
        "`auto`: torch.distributed (NCCL for CUDA tensors, gloo for host tensors), falling back to Ray's "
        "object store when the group cannot form; `distributed` or `object_store` force one path"))
    verify: bool = Field(True, description=(
        "compare a fingerprint of every tensor on both sides (`migration.fingerprint`); a mismatch aborts the "
        "move (the source keeps the stream). Costs one read of the state on each side"))
    timeout_s: float = Field(60.0, gt=0, description=(
        "rendezvous and transfer deadline (seconds) of the distributed path"))
    rendezvous_host: str | None = Field(None, description=(
        "address the target dials for the distributed rendezvous (the source's store); None: the source "
        "node's IP as Ray knows it. Set it to pick one network of a host with several"))
    abandon_after_s: float = Field(300.0, gt=0, description=(
        "a source whose move is neither finished nor aborted this long (seconds; its router died mid-move) "
        "thaws and serves the stream again. Longer than any move; a restarted router reconciles sooner"))


class DurabilitySpec(ConfigModel):
    """Per-stream frame logs (`runtime/durability/frame_log.py`, docs/reliability.md): what is
    acknowledged survives a shard.

    A frame batch, text or stream option is acknowledged only after its record is in the stream's log; a
    dead shard's streams are rebuilt on live shards from the logs, and so are a restarted runtime's.
    """

    enabled: bool = Field(True, description=(
        "off: acknowledgements wait for the engine only, and a dead shard's streams are lost"))
    store: str = Field("disk", description=(
        "`disk` (one append-only, checksummed file per stream under `root`), `memory` (tests, one process "
        "only), or `package.module:attr` called as `attr(spec, runtime_name)` returning a `FrameLog`"))
    root: str | None = Field(None, description=(
        "log directory (`<root>/<runtime name>/<stream>.log`); None: `$MOSAIC_RAY_LOG_DIR`, else "
        "`~/.mosaic_ray/log`, and `mosaic-ray serve` with a private cluster adds `port-<http.port>` (one "
        "directory per server on a host; a restart with the same config finds its streams). `mosaic-ray "
        "serve` locks the directory (`runtime/durability/log_dir_lock.py`): a second server on it refuses to start, "
        "naming the first (`--log-dir DIR` picks another). Several nodes: storage every node reaches (NFS...)"))
    # A killed shard process loses nothing under any policy: the page cache outlives it.
    fsync: Literal["always", "interval", "never"] = Field("interval", description=(
        "`always`: fdatasync before each acknowledgement (survives power loss; p99 39 ms per append "
        "measured); `interval`: a thread fdatasyncs every `fsync_interval_ms` (an OS crash loses at most "
        "that window); `never`: the OS decides (~30 s). A killed shard process loses nothing under any policy"))
    fsync_interval_ms: int = Field(100, ge=1, le=60_000, description=(
        "the `interval` policy's loss window on an OS crash (milliseconds); 100: the last 0.1 s of "
        "acknowledgements, for ~10 syscalls/s per busy stream"))
    max_open_files: int = Field(512, ge=1, description=(
        "log files a shard keeps open (one per stream it writes); beyond, the least recently written is "
        "fsynced and closed. 512 fits Linux's default 1024 descriptors with room for sockets"))
    replay_batch_frames: int = Field(64, ge=1, description=(
        "frames of one stream per engine call while it is rebuilt (as `shard.max_coalesce_frames`; replays "
        "of different streams still meet in one step of the engine's loop); at most the engine's "
        "`max_frames_per_call`"))
    replay_parallel_streams: int = Field(16, ge=1, description=(
        "streams a router rebuilds at once after a shard dies; their frames meet in the shards' step loops "
        "(one forward per step)"))
    # 2026-12-08, H100, 7b-shape: with no per-shard bound, the 8 streams of a killed shard were
    # rebuilt at once (by all signs on the one live shard), 12 of 14 affected streams back only
    # at the end, 34.1-34.2 s after the kill (docs/reliability.md).
    replay_streams_per_shard: int = Field(4, ge=1, description=(
        "rebuilds one shard runs at once; a stream waits for a free one, then goes to the least-loaded live "
        "shard with room, so streams come back in turn and a replacement that has started meanwhile takes "
        "its share (it is empty, so it comes first)"))
    replace_broken_shards: bool = Field(False, description=(
        "a shard whose engine broke or hangs (its health check raises: a lost GPU, a CUDA error) is killed "
        "and its streams rebuilt elsewhere like a dead shard's. Off: a broken engine is kept for an operator "
        "to inspect, and a merely busy engine that misses `shard.health_timeout_s` would be replaced too"))
    recovering_retry_after_s: float = Field(2.0, gt=0, description=(
        "Retry-After (seconds) of the 503 `stream_recovering` answered while a stream is rebuilt (rebuilds "
        "measured 1-4 s on the fake engine)"))
    snapshot_every_frames: int = Field(600, ge=0, description=(
        "a stream's engine state is snapshotted every this many acknowledged frames and its log compacted to "
        "the records after it (at a base; a delta: `snapshot_max_deltas`); a rebuild imports the snapshot and "
        "replays only the tail (`runtime/actors/snapshots.py`). 0: never (whole logs, which grow forever, replayed "
        "whole). 600 = 10 min at 1 fps: a tail of at most 600 frames, ~22 s of prefill alone on an H100 "
        "(27 frames/s measured), inside the 30 s recovery goal. Lower: shorter rebuilds, one snapshot write "
        "(the stream's KV bytes) more often. A custom `store` without `put_snapshot` / `truncate_before` "
        "gets none"))
    # A base costs the stream's KV bytes once more where the engine keeps them (the export's copies),
    # plus one 8 MiB chunk: it is streamed to disk and read back chunk by chunk
    # (`runtime/durability/snapshot_codec.py`), and written whole each time. ~28 GiB of KV per hour of a
    # 7B-shaped stream (on the GPU under `full`, in the host pool under `cluster`); lower it when the
    # host cannot spare the copy, or the disk the writes.
    snapshot_max_bytes: int = Field(64 << 30, ge=0, description=(
        "a stream whose KV (host + device) is larger gets no base (a whole snapshot): without one it is not "
        "snapshotted, its log stays whole and a rebuild replays it all; with one, its chain of deltas goes on "
        "(past `snapshot_max_deltas`). A base is streamed to disk in 8 MiB chunks: it costs the export's copy "
        "of the stream's KV plus one chunk, and writes the stream's KV bytes each time (64 GiB: ~2.3 h of a "
        "7B-shaped stream); a delta holds only what changed. 0: no limit"))
    snapshot_max_deltas: int = Field(8, ge=0, description=(
        "incremental snapshots: after a base, up to this many deltas (only the host-pool slabs changed since "
        "the snapshot before, `engine/snapshot_delta.py`) before the next base; the old deltas are dropped "
        "when it is written. 0: every snapshot whole. The log is compacted only to a base, so a damaged "
        "delta costs a longer replay, not data: 8 bounds the log at 9 cadences (5400 frames, ~68 MB of "
        "12.5 KB JPEGs) and a rebuild's reads at base + 8 parts. An engine whose `export_delta` gives no "
        "generation (the interface's default), or a custom `store` without `put_delta`, gets whole snapshots"))
    snapshot_rebase_ratio: float = Field(1.0, gt=0, description=(
        "a base is written again once the deltas since it add up to more than this share of its bytes (1.0: "
        "a rebuild would read twice what a fresh base holds). On the tiny model a delta after 2 of 26 frames "
        "was 13% of the base (`tests/engine/test_snapshot_delta.py`)"))

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value not in ("disk", "memory") and not _FACTORY_RE.match(value):
            raise ValueError(f"store must be 'disk', 'memory' or 'package.module:attr', got {value!r}")
        return value


class LoadWeights(ConfigModel):
    """Weights of a shard's load score (`mosaic_ray.runtime.actors.load`): the score
    places new streams and drives rebalancing.

    Not yet measured on the real engine. Chosen so one unit = one idle stream: a 1-hour stream of a
    7B model at 1 fps holds ~29 GiB of KV (56 KB/token, 524k tokens), so 1/29 per GiB
    makes it count double; a stream ingesting 1 frame/s adds 0.5; a question per second adds 1.
    """

    stream: float = Field(1.0, ge=0, description="score of each stream the shard holds")
    kv_gib: float = Field(1.0 / 29.0, ge=0, description=(
        "score per GiB of KV the shard holds: 1/29, so a 1-hour 7B stream at 1 fps (~29 GiB) counts double"))
    ingest_fps: float = Field(0.5, ge=0, description="score per frame per second ingested (decaying rate)")
    queries_per_s: float = Field(1.0, ge=0, description="score per question per second (decaying rate)")
    pending_frames: float = Field(0.01, ge=0, description="score per frame queued on the shard")


class RouterSpec(ConfigModel):
    """The router: placement of new streams, persistence of the stream->shard map,
    health probes and rebalancing."""

    skew_ratio: float = Field(1.5, ge=1.0, description=(
        "rebalance when the heaviest shard's load score exceeds this x the lightest's"))
    min_score: float = Field(1.0, gt=0, description=(
        "scores below this count as this much when testing skew (an idle shard is not infinitely lighter "
        "than a shard with one stream)"))
    rebalance_interval_s: float = Field(0.0, ge=0, description=(
        "seconds between automatic rebalancing rounds; 0: no loop (call `rebalance`)"))
    max_migrations_per_round: int = Field(4, ge=1, description="streams moved in one rebalancing round at most")
    health_interval_s: float = Field(10.0, ge=0, description=(
        "seconds between shard health probes of the router's own loop; 0: off"))
    load_cache_s: float = Field(1.0, ge=0, description=(
        "load reports are reused this long (seconds) when placing streams: one round of RPCs per second, not "
        "per new stream; streams placed meanwhile are counted by the router itself"))
    state_store: str = Field("ray_kv", description=(
        "where the stream->shard map lives: `ray_kv` (Ray's GCS key-value store: survives router restarts) "
        "or `file:/path/map.json` (also survives a whole-cluster restart)"))
    weights: LoadWeights = Field(default_factory=LoadWeights, description=(
        "weights of a shard's load score (`LoadWeights`)"))

    @field_validator("state_store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value != "ray_kv" and not value.startswith("file:"):
            raise ValueError(f"state_store must be 'ray_kv' or 'file:/path', got {value!r}")
        return value


class RuntimeConfig(ConfigModel):
    """Everything the runtime (router + shards) needs; one per Serve application."""

    name: str = Field("mosaic", pattern=r"^[A-Za-z0-9_-]{1,64}$", description=(
        "prefix of the runtime's named actors (`<name>:router`, `<name>:shard:<i>`) and state keys: two apps "
        "with different names never share streams"))
    namespace: str = Field("mosaic_ray", pattern=r"^[A-Za-z0-9_-]{1,64}$", description=(
        "Ray namespace of the runtime's named actors"))
    num_shards: int = Field(1, ge=1, le=4096, description=(
        "shard actors, each with its own engine (one GPU each by default)"))
    engine: EngineSpec = Field(default_factory=EngineSpec, description=(
        "how each shard builds its engine (`EngineSpec`)"))
    shard: ShardSpec = Field(default_factory=ShardSpec, description=(
        "one shard actor's resources, queue bounds and timers (`ShardSpec`)"))
    router: RouterSpec = Field(default_factory=RouterSpec, description=(
        "placement, the stream->shard map and rebalancing (`RouterSpec`)"))
    migration: MigrationSpec = Field(default_factory=MigrationSpec, description=(
        "moving a stream between shards (`MigrationSpec`)"))
    durability: DurabilitySpec = Field(default_factory=DurabilitySpec, description=(
        "per-stream frame logs and snapshots (`DurabilitySpec`)"))

    @model_validator(mode="after")
    def _frame_limits_agree(self) -> RuntimeConfig:
        """The frame-count limits of shard, log replay and engine fit each other (real engine only):
        a coalesced append or a replay batch the engine would refuse could never be taken."""
        engine = self.engine.engine_config
        if engine is not None:
            check_frame_limits(engine, self.shard, self.durability)
        if self.shard.max_stream_pending_frames > self.shard.max_pending_frames:
            raise ValueError(f"shard.max_stream_pending_frames ({self.shard.max_stream_pending_frames}) must be at "
                             f"most shard.max_pending_frames ({self.shard.max_pending_frames})")
        return self

    @property
    def router_name(self) -> str:
        return f"{self.name}:router"

    def shard_name(self, index: int) -> str:
        return f"{self.name}:shard:{index}"

    @property
    def shard_names(self) -> list[str]:
        return [self.shard_name(i) for i in range(self.num_shards)]


def check_frame_limits(engine: EngineConfig, shard: ShardSpec, durability: DurabilitySpec) -> None:
    """ValueError naming both fields when a frame limit upstream of the engine exceeds what one
    engine call takes (`max_frames_per_call`) or what may wait for a busy stream
    (`max_deferred_frames`, 0 = frames never wait)."""
    per_call = engine.max_frames_per_call
    for name, value in (("shard.max_coalesce_frames", shard.max_coalesce_frames),
                        ("durability.replay_batch_frames", durability.replay_batch_frames)):
        if value > per_call:
            raise ValueError(f"{name} ({value}) must be at most engine.kwargs.max_frames_per_call ({per_call}): "
                             f"the engine refuses a larger append")
    if 0 < engine.max_deferred_frames < shard.max_coalesce_frames:
        raise ValueError(f"engine.kwargs.max_deferred_frames ({engine.max_deferred_frames}) must be at least "
                         f"shard.max_coalesce_frames ({shard.max_coalesce_frames}): a coalesced append to a stream "
                         f"that is answering would always be refused")
