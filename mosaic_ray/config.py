"""Typed configs of the engine, checked at construction.

Every tunable number of the engine lives in one of these pydantic models (`ConfigModel`: unknown
fields refused, built configs frozen; a changed one is `model_copy(update=...)`). The runtime's
`EngineSpec` validates a deployment's `engine.kwargs` as an `EngineConfig` when the app config is
parsed, so a bad YAML file fails at start naming the field's place, not mid-stream in a shard. Each
field's `description` is what docs/configuration.md says of it (`python -m mosaic_ray.config_docs`).
This module does not import torch (the serve layer checks configs without it); `KVLayout`, the shape
of a model's cache, is derived data, not configuration, and stays a dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from mosaic_ray.config_cache import (  # noqa: F401  (re-exported: the cache's configs)
    CLUSTER_SLAB_TOKENS, DENSE_SLAB_TOKENS, FILLS, RETRIEVAL_METHODS, SCORINGS, CacheConfig, ClusterConfig,
    PoolConfig)
from mosaic_ray.config_model import ConfigModel

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


@dataclass(slots=True)
class KVLayout:
    """Shape of one model's KV cache: what one token costs in every layer and KV head."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype | str = "float32"  # a torch dtype once built
    # 1 for plain RoPE; 3 for Qwen2-VL's M-RoPE (temporal, height, width).
    pos_dims: int = 1

    def __post_init__(self) -> None:
        for name, high in (("num_layers", 1024), ("num_kv_heads", 1024), ("head_dim", 4096), ("pos_dims", 3)):
            value = getattr(self, name)
            if not 1 <= value <= high:
                raise ValueError(f"KVLayout.{name} must be in [1, {high}], got {value!r}")
        self.dtype = resolve_dtype(self.dtype)

    @property
    def groups(self) -> int:
        """Number of independent (layer, KV head) groups; clusters never cross groups."""
        return self.num_layers * self.num_kv_heads

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over every layer and KV head."""
        return 2 * self.groups * self.head_dim * self.dtype.itemsize




class PruningConfig(ConfigModel):
    """Redundant-frame pruning before the vision encoder (`engine.kwargs.pruning`;
    `engine/frame_pruner.py`). A frame whose grayscale thumbnail differs from the stream's last
    *kept* frame by a mean absolute difference <= `threshold` is pruned: no encoder work, no
    tokens, but its timestamp advances the stream's clock. Per stream, `session.update` sets
    `pruning` and `prune_threshold` (`StreamEngine.configure_stream`); the state moves with a
    migrated stream."""

    enabled: bool = Field(False, strict=True, description=(
        "off: a pruned stream's answers no longer equal the model's over every frame (the exactness "
        "contract), so pruning is a deployment's or a stream's choice (docs/results/pruning.md measures "
        "what it saves)"))
    # Since the reference is the last kept frame, slow drift accumulates and is kept once it passes.
    threshold: float = Field(0.02, ge=0, le=1, description=(
        "mean absolute difference of the thumbnails (pixel range 0-1). Frame-to-frame change at 2 fps on "
        "our clips: static footage (tree.avi) median 0.005, fixed camera with walkers (vtest.avi) 0.013, "
        "slow animation (bigbuckbunny) 0.026, moving scenes (bikes) 0.10; docs/results/pruning.md sweeps it"))
    thumb_size: int = Field(32, ge=4, le=256, description=(
        "thumbnail side in pixels (box filter after a strided subsample to <= 4x the side): ignores sensor "
        "noise; 0.06 ms a 112 px frame, 0.3 ms a 1080p one, on the engine thread (2-core VM)"))
    max_gap_s: float = Field(10.0, ge=0, le=1e6, description=(
        "a frame is kept at least this often (stream-clock seconds), so every span of this length has a "
        "frame for a time-range question; 0 = no floor"))


class DevicePoolConfig(ConfigModel):
    """The engine's one preallocated device K/V pool (`engine.kwargs.kv_pool`;
    `cache/device_pool.py`): every stream's sink and window, `full` streams' whole past, each
    question's retrieved set and its own tokens. Give `capacity_tokens` (exact), else on a GPU
    `memory_fraction` of the device memory free once the model is loaded (vLLM's
    gpu_memory_utilization), else on the CPU `cpu_capacity_bytes`."""

    capacity_tokens: int | None = Field(None, ge=1, le=1 << 31, description=(
        "slots of the pool (one token in every layer); None = sized from `memory_fraction` (GPU) or "
        "`cpu_capacity_bytes` (CPU)"))
    memory_fraction: float = Field(0.6, gt=0, le=0.95, description=(
        "share of the GPU memory free after the weights: on an H200 with a 7b-shape model ~74 GiB = 1.4M "
        "tokens (2.6 stream-hours of `full`), with room for activations and the vision tower's batch"))
    cpu_capacity_bytes: int = Field(1 << 30, ge=1, le=1 << 44, description=(
        "CPU default (tests, the demo): ~23k tokens of dino-smollm2, 2M of `tiny`; K/V pages are committed "
        "only as slots are written"))


class SchedulerConfig(ConfigModel):
    """What one engine step may spend (`engine.kwargs.scheduler`; `engine/scheduler.py`)."""

    token_budget: int = Field(8192, ge=1, le=1 << 24, description=(
        "decoder tokens per step: decode tokens of every active question first, then question prefills, "
        "then frame-ingest chunks"))
    encoder_budget: int = Field(32, ge=1, le=1 << 16, description="frames through the vision tower per step")
    # A drain is host-bound: on the H200 at 16 streams of 7b-shape, drains of 64 took 21 ms of host
    # time for 6.3 ms of GPU work and upkeep 40 % of the wall time (docs/benchmarks.md 10.1).
    maintenance_budget: int = Field(2048, ge=0, le=1 << 20, description=(
        "units of background upkeep between steps, over all streams, in turn: a cluster split is one, an "
        "offload of a stream's staged tokens one; 2048 drains a whole `cluster.split_batch` at once"))
    maintenance_share: float = Field(0.25, ge=0, le=1, description=(
        "share of the step loop's time cluster splits may take while questions or frames wait (offloads "
        "always run: they bound device memory); splits are refinement: a cluster waiting for its split is "
        "full and new tokens seed new clusters. 1.0: no limit"))
    # 64 streams on the H200: upkeep GPU time 265 -> 68 ms per 3 s, TTFT p99 through the shard
    # 2.9 -> 0.75 s with the changes of docs/benchmarks.md 10.5.
    offloads_per_step: int = Field(2, ge=0, le=1 << 20, description=(
        "offloads of staged tokens in one upkeep while questions or frames wait, the most staged streams "
        "first; a stream with twice its `offload_batch` staged offloads regardless. Streams opened together "
        "fall due together, and without a limit one upkeep held every question behind all their offloads "
        "(docs/benchmarks.md 10.5). 0: no limit"))
    lag_priority_s: float = Field(1.0, ge=0, le=3600, description=(
        "a stream whose oldest waiting frame is older than this (seconds) ingests before batch questions' "
        "prefills"))
    ingest_wait_s: float = Field(0.5, ge=0, le=60, description=(
        "waiting frames are held back to share one forward until a full vision batch waits "
        "(`encoder_budget` frames, or one per open stream when there are fewer) or the oldest has waited "
        "this long, or the last ingest forward is this old (a frame after a quiet spell goes in at once; "
        "under load, forwards are spaced this far apart); 0 ingests at once. An ingest forward is "
        "launch-bound at a few frames: ~70 ms for 1.4 frames and 135 ms for 16 on an H200 at 7b-shape "
        "(docs/benchmarks.md section 10)"))


class EngineConfig(ConfigModel):
    """One StreamEngine (`runtime.engine.kwargs` of the real engine): a model on one device, many
    streams, one device pool and one host pool."""

    model: str = Field("tiny", min_length=1, description=(
        "a preset (`tiny`, `7b-shape`, `dino-smollm2`) or a local transformers directory (Qwen2-VL / "
        "Qwen2.5-VL)"))
    device: str = Field("auto", description="`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, description=(
        "None = the preset's (tiny: float32, 7b-shape: bfloat16) or the checkpoint's"))
    frame_size: int | None = Field(None, ge=28, le=4096, description=(
        "square side frames are resized to before the vision encoder; None = the model's (tiny 56, 7b-shape "
        "336 = 144 tokens, dino-smollm2 224 = 64 tokens)"))
    cache: CacheConfig = Field(default_factory=CacheConfig, description="every stream's KV cache (`CacheConfig`)")
    kv_pool: DevicePoolConfig = Field(default_factory=DevicePoolConfig, description="the device K/V pool")
    max_streams: int | None = Field(None, ge=1, le=1 << 20, description=(
        "streams one engine (shard) holds; more is 503 `overloaded`. None: as many as the device pool has "
        "room for the resident tokens of (`sink_tokens + window_tokens + offload_batch` each). With "
        "`kv_pool.capacity_tokens` given, a larger value is refused when the config is read"))
    max_frames_per_call: int = Field(256, ge=1, le=1 << 16, description=(
        "frames in one append (one vision batch); the ingress's `max_frames_per_batch`, the shard's "
        "`max_coalesce_frames` and the log's `replay_batch_frames` must fit in it"))
    max_deferred_frames: int = Field(512, ge=0, le=1 << 20, description=(
        "frames that may wait for ingest per stream (before a question's prefill step, or queued by "
        "`submit_frames`); more answers 503"))
    splits_per_step: int = Field(256, ge=0, le=1 << 20, description=(
        "deferred cluster splits drained after every ingest step of the direct path (`append_frames`); the "
        "step loop uses `scheduler.maintenance_budget`"))
    max_question_tokens: int = Field(2048, ge=1, le=1 << 20, description=(
        "prompt + max_tokens limit (also the longest text append)"))
    prefetch: bool = Field(False, strict=True, description=(
        "cross-layer prefetch of question retrieval (exact: misses are fetched at the layer); off because "
        "it runs the rows path beside the one-launch cluster gather and costs more than it hides: H200, "
        "10 min, cluster TTFT 66 -> 146 ms with it (hit rate 0.73; docs/benchmarks.md section 9)"))
    # 2M slots (16 MiB of index per bucket) hold one `full` stream of ~4 h, or 64 questions over
    # 32k slots each (a 1-hour stream at 5 % is ~30k).
    # The sync serializes the prefetch stream with compute: for benchmarks only.
    time_fetch: bool = Field(False, strict=True, description=(
        "time each layer's retrieval exactly: a device synchronize after each layer's fetch, so "
        "`AnswerResult.fetch_s` is device time, not the host time it is otherwise; question prefill then runs "
        "eagerly (no prefill graphs). For benchmarks (`scaling_bench/bench_query.py --time-fetch`); off in "
        "serving"))
    cuda_graphs: bool = Field(True, strict=True, description=(
        "decode steps replay a CUDA graph per batch-size bucket on a GPU (H200, 7b-shape, 8k KV: 7.2 "
        "ms/step at 1 question; the same step eager: 63.6)"))
    graph_max_kv: int = Field(1 << 21, ge=1, le=1 << 28, description=(
        "slots a decode graph batch may attend in all (16 MiB of index per bucket); more decodes eagerly"))
    max_graph_batch: int = Field(64, ge=1, le=256, description=(
        "the largest decode bucket captured; more questions together decode eagerly"))
    prefill_graph_tokens: int = Field(256, ge=0, le=4096, description=(
        "question prefill steps of at most this many packed tokens replay piecewise CUDA graphs (buckets "
        "16, 32, ... up to this, captured at engine start; `engine/prefill_graph.py`; ~0.4 MiB per bucket "
        "token at 7b-shape); larger ones, and any step with `prefetch`, run eagerly. 0: always eager"))
    seed: int = Field(0, ge=0, le=(1 << 63) - 1, description="the engine's sampling seed")
    pruning: PruningConfig = Field(default_factory=PruningConfig, description=(
        "the default of every stream's redundant-frame pruning (`PruningConfig`); a stream switches it "
        "with `session.update`"))
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="the step loop's budgets")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not (value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit())):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {value!r}")
        return value

    @property
    def resident_tokens_per_stream(self) -> int:
        """Device-pool slots one stream holds at least: its sink, its window and the staged tokens of
        one offload batch (a `full` stream holds its whole past besides)."""
        c = self.cache
        return c.sink_tokens + c.window_tokens + c.offload_batch

    def check_pool_room(self, capacity_tokens: int) -> int:
        """The stream limit for a device pool of `capacity_tokens`: `max_streams`, or when None as
        many as the pool holds the resident tokens of. Raises ValueError when the pool cannot hold
        `max_streams` streams' resident tokens (or not even one's)."""
        per = self.resident_tokens_per_stream
        if self.max_streams is None:
            if capacity_tokens < per:
                raise ValueError(f"kv_pool: {capacity_tokens} slots cannot hold one stream's {per} resident tokens "
                                 f"(cache.sink_tokens + window_tokens + offload_batch)")
            return capacity_tokens // per
        if capacity_tokens < self.max_streams * per:
            raise ValueError(
                f"max_streams: {self.max_streams} streams x {per} resident tokens (cache.sink_tokens + "
                f"window_tokens + offload_batch) need {self.max_streams * per} device-pool slots, "
                f"kv_pool holds {capacity_tokens}; lower max_streams or the window, or grow kv_pool")
        return self.max_streams

    @model_validator(mode="after")
    def _pool_holds_every_stream(self) -> EngineConfig:
        if self.kv_pool.capacity_tokens is not None:
            self.check_pool_room(self.kv_pool.capacity_tokens)
        return self

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
