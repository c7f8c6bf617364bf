"""Typed configs, checked at construction.

Inside the engine every tunable number lives in one of these dataclasses; the HTTP boundary has its
own pydantic schemas (`mosaic_ray.serve.schemas`). A config that cannot work raises `ValueError` naming
the field, its allowed range and the value it got, so a bad YAML file fails at start, not mid-stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mosaic_ray.config_cache import (  # noqa: F401  (re-exported: the cache's configs)
    CLUSTER_SLAB_TOKENS, DENSE_SLAB_TOKENS, FILLS, RETRIEVAL_METHODS, SCORINGS, CacheConfig, ClusterConfig,
    PoolConfig)
from mosaic_ray.config_checks import check_range as _check_range

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass(slots=True)
class KVLayout:
    """Shape of one model's KV cache: what one token costs in every layer and KV head."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    # 1 for plain RoPE; 3 for Qwen2-VL's M-RoPE (temporal, height, width).
    pos_dims: int = 1

    def __post_init__(self) -> None:
        _check_range("KVLayout.num_layers", self.num_layers, 1, 1024)
        _check_range("KVLayout.num_kv_heads", self.num_kv_heads, 1, 1024)
        _check_range("KVLayout.head_dim", self.head_dim, 1, 4096)
        _check_range("KVLayout.pos_dims", self.pos_dims, 1, 3)
        self.dtype = resolve_dtype(self.dtype)

    @property
    def groups(self) -> int:
        """Number of independent (layer, KV head) groups; clusters never cross groups."""
        return self.num_layers * self.num_kv_heads

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over every layer and KV head."""
        return 2 * self.groups * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass(slots=True)
class PruningConfig:
    """Redundant-frame pruning before the vision encoder (`engine/frame_pruner.py`).

    A frame is pruned when its grayscale thumbnail differs from the stream's last *kept* frame by
    a mean absolute difference (pixel range 0-1) of at most `threshold`. Pruned frames never reach
    the encoder but still advance the stream's clock.
    """

    # Off by default: a pruned stream's answers no longer equal the model's over every frame (the
    # exactness contract), so pruning is chosen per deployment (`engine.kwargs.pruning`) or per
    # stream (`session.update`). docs/results/pruning.md measures what it saves.
    enabled: bool = False
    # 0.02: frame-to-frame change at 2 fps, 32 px thumbnails, measured on our real clips: static
    # footage (opencv-doc tree.avi) median 0.005, a fixed camera with walkers (vtest.avi) 0.013,
    # moving scenes (bikes.mp4) 0.10, slow animation (bigbuckbunny.mp4) 0.026. Since the reference
    # is the last kept frame, slow drift accumulates and is kept once it passes the threshold.
    threshold: float = 0.02
    # Thumbnail side in pixels (box-filtered): small enough to ignore sensor noise and cost ~0.1 ms.
    thumb_size: int = 32
    # A frame is kept at least this often (seconds of stream clock), however static the scene, so
    # that every span of this length has a frame for a time-range question. 0 = no floor.
    max_gap_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"PruningConfig.enabled must be a bool, got {self.enabled!r}")
        _check_range("PruningConfig.threshold", self.threshold, 0.0, 1.0)
        _check_range("PruningConfig.thumb_size", self.thumb_size, 4, 256)
        _check_range("PruningConfig.max_gap_s", self.max_gap_s, 0.0, 1e6)


@dataclass(slots=True)
class DevicePoolConfig:
    """The engine's one preallocated device K/V pool (`cache/device_pool.py`): every stream's sink
    and window, `full` streams' whole past, each question's retrieved set and its own tokens.

    Give `capacity_tokens` (exact), else on a GPU `memory_fraction` of the device memory free once
    the model is loaded (vLLM's gpu_memory_utilization idea), else on the CPU `cpu_capacity_bytes`.
    """

    capacity_tokens: int | None = None
    # 0.6 of what is free after the weights: a 7b-shape model on an H200 leaves ~124 GiB free, so
    # ~74 GiB = 1.4M tokens = 2.6 stream-hours of `full`, with room for activations and the
    # vision tower's batch.
    memory_fraction: float = 0.6
    # CPU default (tests, the demo): K/V pages are committed only as slots are written; 1 GiB holds
    # ~23k tokens of dino-smollm2 (6 min of 64-token frames at 1 frame/s in `full`), 2M of `tiny`.
    cpu_capacity_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if self.capacity_tokens is not None:
            _check_range("DevicePoolConfig.capacity_tokens", self.capacity_tokens, 1, 1 << 31)
        _check_range("DevicePoolConfig.memory_fraction", self.memory_fraction, 0.0, 0.95, low_open=True)
        _check_range("DevicePoolConfig.cpu_capacity_bytes", self.cpu_capacity_bytes, 1, 1 << 44)


@dataclass(slots=True)
class SchedulerConfig:
    """What one engine step may spend (`engine/scheduler.py`)."""

    # Decoder tokens per step: decode tokens of every active question first, then question
    # prefills, then frame-ingest chunks.
    token_budget: int = 8192
    # Frames through the vision tower per step.
    encoder_budget: int = 32
    # Units of background upkeep between steps, over all streams: a cluster split is one, an
    # offload of a stream's staged tokens one. A drain is host-bound: on the H200 at 16 streams
    # of 7b-shape, drains of 64 took 21 ms of host time for 6.3 ms of GPU work and upkeep 40 % of
    # the wall time (docs/benchmarks.md section 10.1); 2048 drains a whole
    # ClusterConfig.split_batch at once.
    maintenance_budget: int = 2048
    # Share of the step loop's time that cluster splits may take while questions or frames wait
    # (offloads of staged tokens always run: they bound device memory). Splits are refinement,
    # not correctness: a cluster waiting for its split is full (ClusterConfig.max_size) and new
    # tokens seed new clusters, so under load splits wait rather than hold answers and frames
    # back; with nothing else to do they run freely. 1.0: no limit.
    maintenance_share: float = 0.25
    # Offloads of staged tokens in the upkeep after one step while questions or frames wait, the
    # streams with the most staged first; a stream with twice its `offload_batch` staged
    # offloads regardless (it nears the inline bound of four). Streams opened together fall due
    # together: unbounded, one upkeep offloaded every stream in turn, holding every question and
    # frame behind it (64 streams on the H200: upkeep GPU time 265 -> 68 ms per 3 s, TTFT p99
    # through the shard 2.9 -> 0.75 s with the changes of docs/benchmarks.md 10.5). 0: no limit.
    offloads_per_step: int = 2
    # A stream whose oldest waiting frame is older than this (seconds) ingests before batch
    # questions' prefills.
    lag_priority_s: float = 1.0
    # Waiting frames are held back to share one forward until a full vision batch
    # (`encoder_budget` frames, or one per open stream) waits, or the oldest has waited this long
    # (seconds), or the last ingest forward is this old (a frame after a quiet spell goes in at
    # once; under load, forwards are spaced this far apart). An ingest
    # forward is launch-bound at a few frames (H200, 7b-shape: ~70 ms for 1.4 frames, 135 ms for
    # 16): ingesting each frame as it comes spends the GPU on launches and rides on every decode
    # step. 0: ingest at once.
    ingest_wait_s: float = 0.5

    def __post_init__(self) -> None:
        _check_range("SchedulerConfig.token_budget", self.token_budget, 1, 1 << 24)
        _check_range("SchedulerConfig.ingest_wait_s", self.ingest_wait_s, 0.0, 60.0)
        _check_range("SchedulerConfig.encoder_budget", self.encoder_budget, 1, 1 << 16)
        _check_range("SchedulerConfig.maintenance_budget", self.maintenance_budget, 0, 1 << 20)
        _check_range("SchedulerConfig.maintenance_share", self.maintenance_share, 0.0, 1.0)
        _check_range("SchedulerConfig.offloads_per_step", self.offloads_per_step, 0, 1 << 20)
        _check_range("SchedulerConfig.lag_priority_s", self.lag_priority_s, 0.0, 3600.0)


@dataclass(slots=True)
class EngineConfig:
    """One StreamEngine: a model on one device, many streams, one host pool."""

    # A preset (tiny | 7b-shape | dino-smollm2) or a local transformers directory.
    model: str = "tiny"
    # "auto" = cuda when available, else cpu.
    device: str = "auto"
    # None = the preset's dtype (tiny: float32, 7b-shape: bfloat16) or the checkpoint's.
    dtype: str | None = None
    # Square side frames are resized to before the vision encoder; None = the model's default.
    frame_size: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    kv_pool: DevicePoolConfig = field(default_factory=DevicePoolConfig)
    max_streams: int = 1024
    # Frames accepted in one append call (one vision batch).
    max_frames_per_call: int = 256
    # Frames that may wait while the stream answers a question; more is an overload (503).
    max_deferred_frames: int = 512
    # Deferred cluster splits drained after every ingest step (bounded work off the query path).
    splits_per_step: int = 256
    max_question_tokens: int = 2048
    # Cross-layer prefetch of question retrieval (exact: misses are fetched at the layer). Off by
    # default: on an H100 (7b-shape, 10-min stream) it hit 0.74 of cluster rows but raised TTFT
    # from 158 to 327 ms, because selection + gather launch are host-bound and ran twice
    # (docs/benchmarks.md); it pays once selection runs in a fused kernel.
    prefetch: bool = False
    # Time each layer's retrieval exactly: a device synchronize after each layer's fetch, so
    # `AnswerResult.fetch_s` is device time, not the host time it is otherwise; question prefill
    # then runs eagerly (no prefill graphs). For benchmarks (`scaling_bench/bench_query.py
    # --time-fetch`): the sync serializes the prefetch stream with compute. Off in serving.
    time_fetch: bool = False
    # Decode steps (one token per question) replay a CUDA graph per batch-size bucket on a GPU; a
    # batch attending more than `graph_max_kv` slots in all, or more than `max_graph_batch`
    # questions together, decodes eagerly. 2M slots (16 MiB of index per bucket) hold one `full`
    # stream of ~4 h, or 64 questions over 32k slots each (a 1-hour stream at 5 % is ~30k).
    cuda_graphs: bool = True
    graph_max_kv: int = 1 << 21
    max_graph_batch: int = 64
    # Question prefill steps of at most this many packed tokens replay piecewise CUDA graphs (one
    # piece between two attentions, buckets of 16 .. this; `engine/prefill_graph.py`); larger
    # ones run eagerly. 0: always eager. Each bucket keeps its queries and attention outputs of
    # every layer: at 7b-shape ~0.4 MiB per bucket token, ~200 MiB for the buckets up to 256.
    prefill_graph_tokens: int = 256
    seed: int = 0
    # Default for every stream; a stream may switch it (`StreamEngine.configure_stream`).
    pruning: PruningConfig = field(default_factory=PruningConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if isinstance(self.cache, dict):
            self.cache = CacheConfig(**self.cache)
        if isinstance(self.scheduler, dict):
            self.scheduler = SchedulerConfig(**self.scheduler)
        if isinstance(self.pruning, dict):
            self.pruning = PruningConfig(**self.pruning)
        if isinstance(self.kv_pool, dict):
            self.kv_pool = DevicePoolConfig(**self.kv_pool)
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EngineConfig.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.frame_size is not None:
            _check_range("EngineConfig.frame_size", self.frame_size, 28, 4096)
        _check_range("EngineConfig.max_streams", self.max_streams, 1, 1 << 20)
        _check_range("EngineConfig.max_frames_per_call", self.max_frames_per_call, 1, 1 << 16)
        _check_range("EngineConfig.max_deferred_frames", self.max_deferred_frames, 0, 1 << 20)
        _check_range("EngineConfig.splits_per_step", self.splits_per_step, 0, 1 << 20)
        _check_range("EngineConfig.max_question_tokens", self.max_question_tokens, 1, 1 << 20)
        _check_range("EngineConfig.graph_max_kv", self.graph_max_kv, 1, 1 << 28)
        _check_range("EngineConfig.max_graph_batch", self.max_graph_batch, 1, 256)
        _check_range("EngineConfig.prefill_graph_tokens", self.prefill_graph_tokens, 0, 4096)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
