"""Typed configs, checked at construction.

Inside the engine every tunable number lives in one of these dataclasses; the HTTP boundary has its
own pydantic schemas (`mosaic_ray.serve.schemas`). A config that cannot work raises `ValueError` naming
the field, its allowed range and the value it got, so a bad YAML file fails at start, not mid-stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

RETRIEVAL_METHODS = ("full", "frame", "token", "cluster")
SCORINGS = ("mean", "max")  # CacheConfig.scoring
FILLS = ("prefix", "skip")  # CacheConfig.fill
DENSE_SLAB_TOKENS = 16  # PoolConfig.slab_tokens when unset, for full / frame / token
CLUSTER_SLAB_TOKENS = 4  # ... and for cluster retrieval

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
    """Raise ValueError naming the field and its range when `value` falls outside [low, high]."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")


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
class PoolConfig:
    """The pinned host pool of one shard.

    Give `capacity_bytes` (exact budget) or `ram_fraction` (share of the RAM free at start). The
    pool refuses to start when the request exceeds `max_ram_fraction` of free RAM.
    """

    capacity_bytes: int | None = None
    ram_fraction: float = 0.25
    # Refuse to take more than this share of the RAM free at start: the OS, Ray's object store and
    # the model's own host copies need the rest.
    max_ram_fraction: float = 0.8
    # Tokens per slab; None: chosen by the cache (`CacheConfig`): 16 for the dense logs of the
    # full / frame / token methods (16 rows of a 128-dim bf16 head = 4 KB of K per slab), 4 for
    # cluster retrieval, where every cluster owns whole slabs and clusters are small (real weights,
    # docs/benchmarks.md section 8: ~6 tokens at variance_ratio 0.5, slabs 77 % full against 34 %
    # with 16; 1.3 tokens at 0.15, 33 % against 8 %), and 4 rows of a 128-dim head are still 1 KB
    # runs, read at full UVA speed (>= 1 KB rows run at ~49.5 GB/s, FACTS.md).
    slab_tokens: int | None = None
    # "auto": pin when CUDA is available (pinned pages are what the UVA gather reads).
    pin_memory: str = "auto"

    def __post_init__(self) -> None:
        if self.capacity_bytes is not None:
            _check_range("PoolConfig.capacity_bytes", self.capacity_bytes, 0, None, low_open=True)
        _check_range("PoolConfig.ram_fraction", self.ram_fraction, 0.0, 1.0, low_open=True)
        _check_range("PoolConfig.max_ram_fraction", self.max_ram_fraction, 0.0, 1.0, low_open=True)
        if self.slab_tokens is not None:
            _check_range("PoolConfig.slab_tokens", self.slab_tokens, 1, 4096)
        if self.pin_memory not in ("auto", "yes", "no"):
            raise ValueError(f"PoolConfig.pin_memory must be one of auto|yes|no, got {self.pin_memory!r}")


@dataclass(slots=True)
class ClusterConfig:
    """Cohesion-aware adaptive assignment and deferred splitting (DESIGN.md section 2)."""

    # A token joins its nearest cluster only if the cluster's variance (mean squared distance of
    # members to the centroid) stays <= variance_ratio x the running key variance of its
    # (layer, head). 0.5, memory-first: on real features 0.15 makes clusters of 1.3 tokens (56 %
    # singletons), whose index (a centroid and slab table each) costs as much GPU memory as the
    # K/V itself, and 9x the host pool of 0.5 (docs/benchmarks.md section 8); 0.5 makes clusters
    # of ~6 tokens and recalls 0.953 of exact top-k mass at a 5 % budget (0.15: 0.970) with 1.16x
    # token's output error (0.15: 1.06x) and 4.4x fewer copies (section 4). Set 0.15 for accuracy.
    variance_ratio: float = 0.5
    # Clusters larger than this are queued for a deferred 2-means split (prototype: 64).
    split_size: int = 64
    # A cluster this large is full: it takes no new member until it has been split, and a token
    # that would have joined it joins the nearest cluster with room, or seeds one. Bounds the slab
    # table and the work of one split. Measured on real features (dino-smollm2, bigbuckbunny +
    # bikes at 5 fps, 5 % budget): max_size 64 (no size splits at all: clusters fill in arrival
    # order) recalls 0.673 of exact top-k past mass against 0.759 with 128, whose 2-means splits
    # keep clusters tighter than the variance bound alone (worst layer 0.59 vs 0.85).
    max_size: int = 128
    # Deferred splits drained per call of `drain_splits` (bounded work off the query path). A drain
    # is ~300 launches and ~5 host syncs whatever its size (H200, 7b-shape: 21 ms of host time and
    # 6.3 ms of GPU work for 64 splits), and one offload of 1024 staged tokens of a 7b-shape stream
    # flagged ~1.7k splits (docs/benchmarks.md section 10.1): one drain takes them all.
    split_batch: int = 2048
    # Lloyd iterations of each 2-means split.
    split_iters: int = 8
    # Rounds of in-batch seeding: tokens no existing cluster can take seed new clusters, one new
    # cluster per group per round; after this many rounds the rest join their nearest seed and the
    # seed is queued for a split (never an unbounded loop on the ingest path).
    seed_rounds: int = 16
    # Unassigned tokens of one insert are seeded in runs of this many consecutive (arrival-order)
    # tokens, each run on its own: seeding costs runs x seed_chunk^2 distances instead of
    # tokens^2 (64 7b-shape streams on an H200: offloads of ~2.5k staged tokens took 41 % of the
    # engine's time, seeding the largest part; 24 % with 512, docs/benchmarks.md 10.4). Runs never
    # share a cluster; the next insert joins across them.
    # 0 = all of a batch's unassigned tokens together.
    seed_chunk: int = 512
    # Elements of one [groups, tokens, clusters] distance block; larger batches are chunked by
    # group so that assignment memory stays bounded however many clusters a stream has.
    distance_block_elems: int = 1 << 26
    # Text segments (captions, Q/A turns) as units of their own: kept out of the video clusters,
    # their keys exact on the device (~29 KB a token at 7B shapes), scored by their best token and
    # fetched whole (`ClusterIndex`). On since 2026-12-04 (docs/benchmarks.md 5.1, real weights):
    # needle accuracy at 5 / 10 / 20 % budgets 30 / 20 / 40 % -> 90 / 90 / 90 % (full attention:
    # 80 %), at the price of attention-mass fidelity on video (past recall at 5 % 0.756 -> 0.656,
    # output error 0.123 -> 0.150, section 4.1): whole captions take budget the video had.
    text_units: bool = True
    # What a video cluster is scored by: "centroid" (its mean key) or "bound" (Quest-style: the
    # per-dimension min and max of its members' keys, kept on the device, so q . k of every member
    # is at most q+ . max + q- . min; twice the centroid's device memory more).
    representative: str = "centroid"

    def __post_init__(self) -> None:
        _check_range("ClusterConfig.variance_ratio", self.variance_ratio, 0.0, 100.0, low_open=True)
        _check_range("ClusterConfig.split_size", self.split_size, 2, 65536)
        _check_range("ClusterConfig.max_size", self.max_size, self.split_size, 65536)
        _check_range("ClusterConfig.split_batch", self.split_batch, 1, 1 << 20)
        _check_range("ClusterConfig.split_iters", self.split_iters, 1, 100)
        _check_range("ClusterConfig.seed_rounds", self.seed_rounds, 1, 1024)
        _check_range("ClusterConfig.seed_chunk", self.seed_chunk, 0, 1 << 20)
        _check_range("ClusterConfig.distance_block_elems", self.distance_block_elems, 1 << 10, 1 << 34)
        if self.representative not in ("centroid", "bound"):
            raise ValueError(f"ClusterConfig.representative must be centroid|bound, got {self.representative!r}")


@dataclass(slots=True)
class CacheConfig:
    """The per-stream KV cache: resident sink + local window on the device, the past retrieved."""

    retrieval: str = "cluster"
    # Tokens retrieved per (layer, KV head) for one question. `budget_ratio` (share of the
    # offloaded past) is used when `budget_tokens` is None; the larger of the two floors applies.
    budget_tokens: int | None = None
    budget_ratio: float = 0.1
    min_budget_tokens: int = 64
    # First tokens of the stream (system prompt, first frame's first tokens) stay resident: the
    # first token is a huge attention sink (0.88-0.99 of the mass in upper layers, FACTS.md).
    sink_tokens: int = 16
    # Most recent tokens kept on the device; tokens leaving it go to the retrieval structure.
    window_tokens: int = 2048
    # Tokens that leave the window are offloaded (handed to the retriever: clustered, copied to
    # the host pool) in batches of at least this many. Until then they stay where they are, in the
    # device pool, and questions attend them exactly, like the window. An insert is mostly
    # launches and host syncs: on the H200 at 7B shapes one of 7 frames (146 tokens each) cost
    # 1.8x one of a single frame, 3.9x less per frame (docs/benchmarks.md section 10.1), and the
    # offload leaves the ingest forward; the price is up to 4x this many more tokens held on the
    # device per stream. 1: offload at once, inside the ingest.
    offload_batch: int = 1024
    # Frame method: at most this many blocks per question and layer-head (ReKV-style top-k).
    frame_top_k: int | None = None
    # How a question scores the past's units (tokens, frame blocks, clusters), per (layer, KV head):
    # "mean": by its mean query (over its tokens and the group's query heads); "max": by the best
    # per-token attention estimate over every one of those queries, each normalised by its own
    # partition (resident tokens + the past, a unit counted size times; `cache/query_set.py`).
    # "max" since 2026-12-04 (docs/benchmarks.md 4.1, real DINOv2 + SmolLM2 on CPU): needle accuracy
    # at 5 / 10 / 20 % budgets token 0 / 0 / 0 % -> 40 / 40 / 40 %, cluster (with fill "skip")
    # 0 / 0 / 10 % -> 30 / 20 / 40 % (full: 80 %); attention-output error at 5 %: token 0.115 ->
    # 0.103, cluster 0.127 -> 0.123; past recall of the averaged attention (what the mean query
    # ranks for): token 0.951 -> 0.966, cluster 0.784 -> 0.756. Its cost on a GPU is not measured yet
    # (~140 queries per KV head instead of one: two passes over the units per layer).
    scoring: str = "max"
    # Units are taken best-first within the budget. "prefix": the first unit that does not fit
    # stops the selection; "skip": it is skipped and smaller ones after it still fill the budget
    # (`selection.greedy_fill`). "skip" since 2026-12-04: cluster past recall at 5 % 0.758 -> 0.784,
    # output error 0.132 -> 0.127 (mean scoring), needle at 5 % 20 -> 30 % (max scoring).
    fill: str = "skip"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVAL_METHODS:
            raise ValueError(
                f"CacheConfig.retrieval must be one of {'|'.join(RETRIEVAL_METHODS)}, got {self.retrieval!r}"
            )
        if self.budget_tokens is not None:
            _check_range("CacheConfig.budget_tokens", self.budget_tokens, 1, 1 << 24)
        _check_range("CacheConfig.budget_ratio", self.budget_ratio, 0.0, 1.0, low_open=True)
        _check_range("CacheConfig.min_budget_tokens", self.min_budget_tokens, 0, 1 << 24)
        _check_range("CacheConfig.sink_tokens", self.sink_tokens, 0, 1 << 16)
        _check_range("CacheConfig.window_tokens", self.window_tokens, 1, 1 << 22)
        _check_range("CacheConfig.offload_batch", self.offload_batch, 1, 1 << 20)
        if self.frame_top_k is not None:
            _check_range("CacheConfig.frame_top_k", self.frame_top_k, 1, 1 << 20)
        if self.scoring not in SCORINGS:
            raise ValueError(f"CacheConfig.scoring must be one of {'|'.join(SCORINGS)}, got {self.scoring!r}")
        if self.fill not in FILLS:
            raise ValueError(f"CacheConfig.fill must be one of {'|'.join(FILLS)}, got {self.fill!r}")
        if isinstance(self.cluster, dict):
            self.cluster = ClusterConfig(**self.cluster)
        if isinstance(self.pool, dict):
            self.pool = PoolConfig(**self.pool)
        if self.pool.slab_tokens is None:
            self.pool = dataclasses.replace(self.pool, slab_tokens=CLUSTER_SLAB_TOKENS if self.retrieval == "cluster"
                                            else DENSE_SLAB_TOKENS)

    def budget_for(self, past_tokens: int) -> int:
        """Tokens to retrieve per (layer, KV head) for a past of `past_tokens` offloaded tokens."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return max(self.min_budget_tokens, int(round(self.budget_ratio * past_tokens)))


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
