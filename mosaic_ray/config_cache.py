"""Typed configs of a stream's KV cache: the host pool, the cluster index and the cache itself
(sink, window, budget, how a question scores and fills). Re-exported by `mosaic_ray.config`,
where the engine's configs that hold them live."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mosaic_ray.config_checks import check_range as _check_range

RETRIEVAL_METHODS = ("full", "frame", "token", "cluster")
SCORINGS = ("mean", "max", "mass")  # CacheConfig.scoring
REPRESENTATIVES = ("centroid", "bound", "spread")  # ClusterConfig.representative
FILLS = ("prefix", "skip")  # CacheConfig.fill
DENSE_SLAB_TOKENS = 16  # PoolConfig.slab_tokens when unset, for full / frame / token
CLUSTER_SLAB_TOKENS = 4  # ... and for cluster retrieval


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
    # runs, read at full UVA speed (>= 1 KB rows run at ~49.5 GB/s on an H100).
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
    """Cohesion-aware adaptive assignment and deferred splitting (docs/architecture.md)."""

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
    # is at most q+ . max + q- . min; twice the centroid's device memory more), or "spread" (the
    # centroid plus the cluster's key variance: a member's expected exp(q . k) for keys spread
    # normally around the centroid, q . c + |q|^2 var / 2D; no memory more; with scoring "max"|"mass").
    representative: str = "centroid"
    # Co-activation (issue 19 item 4): clusters reshaped by what questions attend. After a
    # question's retrieval, per (layer, KV head), the members that would get the most of its
    # attention (this share of the budget; found among `coactivation_probe` budgets of its best
    # clusters) are regrouped, at the next upkeep, into exact units: split out of their clusters,
    # co-attended members of several clusters merged, in units of `coactivation_unit` tokens (at
    # most max_size) scored by their best token's exact key, as text units are. The cold rest
    # stays in its clusters, whose centroids no longer average the hot members away.
    # 0 = off. The tokens it makes exact stay under `coactivation_max_share` of a (layer, head)'s
    # tokens (text units, exact anyway, not counted; cache/coactivation.py). Needs every query of a
    # question (`CacheConfig.scoring` "max" or "mass"); inactive with "mean". On (1.0) since
    # 2026-12-07: on real DINOv2-small -> SmolLM2-135M streams, needle accuracy in the sequential
    # protocol 42 -> 50 % at 5 % and 46 -> 50 % at 10 % (full: 50 %; 48 questions), the
    # independent protocol unchanged (no earlier question); past recall at 5 % 0.656 -> 0.77. Its
    # price at 7B shapes (H100, 86k past tokens): ~125 ms of upkeep per question off the question's
    # path, and the exact keys: up to 1.8 -> 4.0 GiB of device memory per stream-hour (measured
    # before the exact-key table was compacted; docs/benchmarks.md 4.3, 9.2).
    coactivation: float = 1.0
    coactivation_unit: int = 8
    coactivation_max_share: float = 0.1
    # What a question would have attended is found at the next maintenance, not on its path: its
    # best clusters, this many times its budget of them, scored member by member with exact keys
    # read from the pool (so members it did not retrieve are found too).
    coactivation_probe: float = 8.0

    def __post_init__(self) -> None:
        _check_range("ClusterConfig.variance_ratio", self.variance_ratio, 0.0, 100.0, low_open=True)
        _check_range("ClusterConfig.split_size", self.split_size, 2, 65536)
        _check_range("ClusterConfig.max_size", self.max_size, self.split_size, 65536)
        _check_range("ClusterConfig.split_batch", self.split_batch, 1, 1 << 20)
        _check_range("ClusterConfig.split_iters", self.split_iters, 1, 100)
        _check_range("ClusterConfig.seed_rounds", self.seed_rounds, 1, 1024)
        _check_range("ClusterConfig.seed_chunk", self.seed_chunk, 0, 1 << 20)
        _check_range("ClusterConfig.distance_block_elems", self.distance_block_elems, 1 << 10, 1 << 34)
        _check_range("ClusterConfig.coactivation", self.coactivation, 0.0, 64.0)
        _check_range("ClusterConfig.coactivation_unit", self.coactivation_unit, 1, 65536)  # at most max_size used
        _check_range("ClusterConfig.coactivation_max_share", self.coactivation_max_share, 0.0, 1.0)
        _check_range("ClusterConfig.coactivation_probe", self.coactivation_probe, 1.0, 64.0)
        if self.representative not in REPRESENTATIVES:
            raise ValueError(f"ClusterConfig.representative must be one of {'|'.join(REPRESENTATIVES)}, "
                             f"got {self.representative!r}")


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
    # first token is a huge attention sink (0.88-0.99 of the mass in upper layers, measured on SmolLM2-135M).
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
    # partition (resident tokens + the past, a unit counted size times; `cache/query_set.py`);
    # "mass": by the mean of those estimates (with the token method: exact top-B by the true
    # attention of the question's prefill, the needle harness's oracle; not a serving default).
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
