"""Typed configs of a stream's KV cache: the host pool, the cluster index and the cache itself
(sink, window, budget, how a question scores and fills). Re-exported by `mosaic_ray.config`,
where the engine's configs that hold them live.

Pydantic models (`ConfigModel`: unknown fields refused, built configs frozen), so the YAML of a
deployment is checked down to these fields when the app config is parsed, each error naming its
place. Every field's `description` is what docs/configuration.md says of it (generated:
`python -m mosaic_ray.config_docs`); a comment above a field keeps the longer reasoning.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mosaic_ray.config_model import ConfigModel

RETRIEVAL_METHODS = ("full", "frame", "token", "cluster")
SCORINGS = ("mean", "max", "mass")  # CacheConfig.scoring
REPRESENTATIVES = ("centroid", "bound", "spread")  # ClusterConfig.representative
FILLS = ("prefix", "skip")  # CacheConfig.fill
DENSE_SLAB_TOKENS = 16  # PoolConfig.slab_tokens when unset, for full / frame / token
CLUSTER_SLAB_TOKENS = 4  # ... and for cluster retrieval


class PoolConfig(ConfigModel):
    """The pinned host pool of one shard (`engine.kwargs.cache.pool`): where the offloaded past
    lives. Give `capacity_bytes` (exact budget) or `ram_fraction` (share of the RAM free at start);
    the pool refuses to start when that exceeds `max_ram_fraction` of the free RAM."""

    capacity_bytes: int | None = Field(None, gt=0, description="exact size in bytes; None: `ram_fraction`")
    ram_fraction: float = Field(0.25, gt=0, le=1, description="share of the RAM free at start, when no `capacity_bytes`")
    # The OS, Ray's object store and the model's own host copies need the rest.
    max_ram_fraction: float = Field(0.8, gt=0, le=1, description=(
        "refuse to start above this share of free RAM (the error names the numbers)"))
    # 16 rows of a 128-dim bf16 head = 4 KB of K per slab; for clusters, 77 % full slabs at the
    # default variance_ratio against 34 % with 16 (docs/benchmarks.md section 8).
    slab_tokens: int | None = Field(None, ge=1, le=4096, description=(
        "rows per slab; None picks 4 for cluster retrieval (a cluster owns whole slabs and clusters are "
        "small: 2.3x less host memory than 16 at the default variance_ratio, 4x at 0.15; docs/benchmarks.md "
        "section 8) and 16 for full / frame / token (dense logs). 4 rows of a 128-dim bf16 head are 1 KB "
        "runs, still full-speed UVA reads (rows of 1 KB and more read at ~49.5 GB/s on an H100)"))
    pin_memory: Literal["auto", "yes", "no"] = Field("auto", description=(
        "pin when CUDA is present (pinned pages are what the UVA gather reads); `yes` / `no` to force"))


class ClusterConfig(ConfigModel):
    """Cohesion-aware adaptive assignment and deferred splitting (`engine.kwargs.cache.cluster`;
    `cache/cluster_index.py`, `cache/splitter.py`, docs/architecture.md)."""

    variance_ratio: float = Field(0.5, gt=0, le=100, description=(
        "a token joins its nearest cluster only if the cluster's variance (mean squared distance of members "
        "to the centroid) stays <= this x the running key variance of its (layer, head). Memory-first since "
        "2026-11-25 (was 0.15): on real features 0.15 makes clusters of 1.3 tokens whose index costs as much "
        "GPU memory as the K/V itself and 9x the host pool of 0.5 (docs/benchmarks.md section 8); 0.5 makes "
        "~6-token clusters, recalls 0.953 of exact top-k mass at a 5 % budget (0.15: 0.970) with 1.16x "
        "token's output error (0.15: 1.06x) and 4.4x fewer copies (section 4). Set 0.15 when accuracy "
        "matters more than memory"))
    split_size: int = Field(64, ge=2, le=65536, description="clusters larger than this are queued for a deferred 2-means split")
    # max_size 64 (= split_size: no size split ever, clusters fill in arrival order) recalled 0.673
    # of the exact past mass against 0.759 with 128 (dino-smollm2, bigbuckbunny + bikes, 5 % budget).
    max_size: int = Field(128, ge=2, le=65536, description=(
        "a cluster this large is full: a token that would join it joins the nearest cluster with room, or "
        "seeds one; it takes members again once split (bounds the slab table and a split's work). At least "
        "`split_size`. 64 (no size split ever) recalled 0.673 of the exact past mass against 0.759 on real "
        "features (5 % budget)"))
    # A drain is ~300 launches and ~5 host syncs whatever its size (H200, 7b-shape: 21 ms of host
    # time and 6.3 ms of GPU work for 64 splits; docs/benchmarks.md section 10.1).
    split_batch: int = Field(2048, ge=1, le=1 << 20, description=(
        "clusters split per `drain_splits` call; one offload of a 7b-shape stream flags ~1.7k, and one drain "
        "takes them all"))
    split_iters: int = Field(8, ge=1, le=100, description="Lloyd iterations of each 2-means split")
    seed_rounds: int = Field(16, ge=1, le=1024, description=(
        "rounds of in-batch seeding (one new cluster per group per round); after them the rest join their "
        "nearest seed, which is queued for a split (never an unbounded loop on the ingest path)"))
    # 64 7b-shape streams on an H200: offloads of ~2.5k staged tokens took 41 % of the engine's
    # time, seeding the largest part; 24 % with 512 (docs/benchmarks.md 10.4).
    seed_chunk: int = Field(512, ge=0, le=1 << 20, description=(
        "unassigned tokens of an insert are seeded in runs of this many consecutive tokens, each run on its "
        "own (cost runs x chunk^2 instead of tokens^2; runs never share a cluster, the next insert joins "
        "across them); 0 = all together"))
    distance_block_elems: int = Field(1 << 26, ge=1 << 10, le=1 << 34, description=(
        "elements of one [groups, tokens, clusters] distance block; larger batches are chunked by group, so "
        "assignment memory stays bounded however many clusters a stream has"))
    text_units: bool = Field(True, strict=True, description=(
        "captions and Q/A turns as units of their own: out of the video clusters, exact keys on the device "
        "(~29 KB a token at 7B shapes), scored by their best token, fetched whole. On since 2026-12-04: "
        "needle accuracy 30 / 20 / 40 % -> 90 / 90 / 90 % at 5 / 10 / 20 % budgets (full 80 %), "
        "attention-mass fidelity on video lower (past recall 0.756 -> 0.656 at 5 %; docs/benchmarks.md "
        "4.1, 5.1)"))
    representative: Literal["centroid", "bound", "spread"] = Field("centroid", description=(
        "what a video cluster is scored by: `centroid`, its mean key; `spread`, the centroid plus its key "
        "variance (q . c + |q|^2 var / 2D, a member's expected exp(q . k); past recall at 5 % 0.656 -> "
        "0.675, docs/benchmarks.md 4.2); or `bound` (Quest-style per-dimension min / max of its members' "
        "keys; 2x the centroid's device memory more), measured much worse on real keys (needles 90 -> 0 % "
        "at 5 %, past recall 0.656 -> 0.235; docs/benchmarks.md 4.1)"))
    # Issue 19 item 4. Inactive with scoring "mean" (it needs every query of a question). The
    # tokens it makes exact stay under `coactivation_max_share` (cache/coactivation.py).
    coactivation: float = Field(1.0, ge=0, le=64, description=(
        "clusters reshaped by what questions attend (`cache/coactivation.py`): after a question, the members "
        "that would get most of its attention (this many budgets' worth per (layer, KV head)) leave their "
        "clusters for exact units, found at the next upkeep, off the question's path. 0 = off; inactive with "
        "`scoring` `mean`. On since 2026-12-07: needle suite (sequential) 42 -> 50 % at 5 %, 46 -> 50 % at "
        "10 % (full 50 %); past recall at 5 % 0.656 -> 0.773; on an H100 at 7B shapes ~125 ms of upkeep per "
        "question and up to 1.8 -> 4.0 GiB of device memory per stream-hour (docs/benchmarks.md 4.3, 9.2)"))
    coactivation_unit: int = Field(8, ge=1, le=65536, description=(
        "tokens per exact unit (the hottest together, in stream order; at most `max_size` used); 1, 4 and 8 "
        "recalled alike, with 8613, 2188 and 1987 copies per question"))
    coactivation_max_share: float = Field(0.1, ge=0, le=1, description=(
        "at most this share of a (layer, head)'s tokens is made exact by co-activation (text units not "
        "counted): bounds its device memory; 0.2 recalled no more"))
    coactivation_probe: float = Field(8.0, ge=1, le=64, description=(
        "how much of a question's best clusters its upkeep reads back to find what it attends, in budgets: "
        "2, 4 and 8 recalled 0.735, 0.772 and 0.780; each layer costs ceil(members read / max_size) units "
        "of upkeep, under the scheduler's time share"))

    @model_validator(mode="after")
    def _max_size_holds_a_split(self) -> ClusterConfig:
        if self.max_size < self.split_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least split_size ({self.split_size})")
        return self


class CacheConfig(ConfigModel):
    """The per-stream KV cache (`engine.kwargs.cache`): resident sink + local window on the device,
    the past offloaded to the host pool and retrieved per question."""

    retrieval: Literal["full", "frame", "token", "cluster"] = Field("cluster", description=(
        "how a question reaches the offloaded past: `full` (all of it, on the device), `frame` (whole frame "
        "blocks), `token` (exact top tokens), `cluster` (whole clusters)"))
    budget_tokens: int | None = Field(None, ge=1, le=1 << 24, description=(
        "tokens retrieved per (layer, KV head) for one question; None: `budget_ratio`"))
    budget_ratio: float = Field(0.1, gt=0, le=1, description=(
        "share of the offloaded past retrieved, when no `budget_tokens`; floor `min_budget_tokens`"))
    min_budget_tokens: int = Field(64, ge=0, le=1 << 24, description="the floor of a `budget_ratio` budget")
    sink_tokens: int = Field(16, ge=0, le=1 << 16, description=(
        "first tokens kept resident: the first token is a huge attention sink (0.88-0.99 of the mass in "
        "upper layers, measured on SmolLM2-135M)"))
    window_tokens: int = Field(2048, ge=1, le=1 << 22, description=(
        "recent tokens kept on the device (an ingest chunk attends over sink + window)"))
    # An insert is mostly launches and host syncs: on the H200 at 7B shapes one of 7 frames (146
    # tokens each) cost 1.8x one of a single frame, 3.9x less per frame (docs/benchmarks.md 10.1).
    offload_batch: int = Field(1024, ge=1, le=1 << 20, description=(
        "tokens that leave the window stay in the device pool (questions attend them in place, exactly) "
        "until this many have gathered; then one insert hands them to the retriever as background upkeep "
        "(~4x less host cost per frame at 7 frames per insert on the H200). A stream whose upkeep falls "
        "behind offloads inline at 4x this. 1: offload at once"))
    frame_top_k: int | None = Field(None, ge=1, le=1 << 20, description=(
        "`frame` retrieval: at most this many blocks per question and (layer, KV head); None: no cap"))
    # "max" since 2026-12-04 (docs/benchmarks.md 4.1, real DINOv2 + SmolLM2 on CPU): attention-
    # output error at 5 %: token 0.115 -> 0.103, cluster 0.127 -> 0.123; its GPU cost is ~140
    # queries per KV head instead of one (two passes over the units per layer).
    scoring: Literal["mean", "max", "mass"] = Field("max", description=(
        "how a question scores the past's units per (layer, KV head): `max`, by the best per-token attention "
        "estimate over every query of the question and the group's query heads, each normalised by its "
        "partition (resident tokens + the past; `cache/query_set.py`); `mean`, by the mean query; `mass`, by "
        "the mean of those estimates (with `token`: exact top-B by the question's true attention, the needle "
        "harness's oracle). `max` since 2026-12-04: needle accuracy token 0 -> 40 %, cluster 0-10 -> 20-40 % "
        "at 5-20 % budgets (full 80 %), lower output error (docs/benchmarks.md 4.1, 5.1)"))
    fill: Literal["prefix", "skip"] = Field("skip", description=(
        "units best-first within the budget: `skip` passes over a unit that does not fit and fills the rest "
        "with smaller ones (`selection.greedy_fill`); `prefix` stops at the first. `skip` since 2026-12-04: "
        "cluster past recall at 5 % 0.758 -> 0.784"))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="the cluster index (below)")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="the host pool (below)")

    @model_validator(mode="before")
    @classmethod
    def _slab_tokens_follow_the_method(cls, data):
        """An unset `pool.slab_tokens` becomes the retrieval method's (4 for cluster, 16 otherwise)."""
        if not isinstance(data, dict):
            return data
        method = data.get("retrieval", "cluster")
        slabs = CLUSTER_SLAB_TOKENS if method == "cluster" else DENSE_SLAB_TOKENS
        pool = data.get("pool")
        if pool is None:
            return {**data, "pool": {"slab_tokens": slabs}}
        if isinstance(pool, dict) and pool.get("slab_tokens") is None:
            return {**data, "pool": {**pool, "slab_tokens": slabs}}
        if isinstance(pool, PoolConfig) and pool.slab_tokens is None:
            return {**data, "pool": pool.model_copy(update={"slab_tokens": slabs})}
        return data

    def budget_for(self, past_tokens: int) -> int:
        """Tokens to retrieve per (layer, KV head) for a past of `past_tokens` offloaded tokens."""
        if self.budget_tokens is not None:
            return self.budget_tokens
        return max(self.min_budget_tokens, int(round(self.budget_ratio * past_tokens)))
