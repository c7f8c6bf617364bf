"""`Variant`: one retrieval configuration a harness replays (fidelity, needle): a method and the
cache and cluster knobs it runs with, each defaulting to the engine's own."""

from __future__ import annotations

from dataclasses import dataclass

from mosaic_ray.config import CacheConfig, ClusterConfig, PoolConfig

_CLUSTER = ClusterConfig()  # the engine's defaults
_CACHE = CacheConfig()


@dataclass(slots=True)
class Variant:
    name: str
    method: str
    variance_ratio: float = _CLUSTER.variance_ratio
    split_size: int = _CLUSTER.split_size
    # None: the engine's max_size, or twice split_size when that is larger (a split must fit)
    max_size: int | None = None
    slab_tokens: int | None = None  # None: the engine's choice for the method (PoolConfig)
    scoring: str = _CACHE.scoring
    fill: str = _CACHE.fill
    text_units: bool = _CLUSTER.text_units
    representative: str = _CLUSTER.representative
    coactivation: float = _CLUSTER.coactivation
    coactivation_unit: int = _CLUSTER.coactivation_unit
    coactivation_probe: float = _CLUSTER.coactivation_probe
    coactivation_max_share: float = _CLUSTER.coactivation_max_share
    # Fidelity: drain every pending split before each question (the engine drains a bounded batch
    # per ingest step only): shows what the split backlog at query time costs.
    drain_before_query: bool = False
    # Needle oracle: retrieve only the past within this many seconds of the needle asked about
    # (the question's since/until), so the model sees the needle whole and little else.
    oracle_s: float | None = None

    def cache_config(self, sink: int, window: int, capacity_bytes: int, budget_ratio: float = _CACHE.budget_ratio
                     ) -> CacheConfig:
        """The variant's CacheConfig. Tokens are offloaded as they leave the window (offload_batch
        1): the budget and the selection are measured over the whole past, nothing waits staged."""
        max_size = (max(_CLUSTER.max_size, 2 * self.split_size) if self.max_size is None
                    else max(self.max_size, self.split_size))
        return CacheConfig(
            retrieval=self.method, sink_tokens=sink, window_tokens=window, budget_ratio=budget_ratio,
            scoring=self.scoring, fill=self.fill, offload_batch=1,
            cluster=ClusterConfig(variance_ratio=self.variance_ratio, split_size=self.split_size, max_size=max_size,
                                  text_units=self.text_units, representative=self.representative,
                                  coactivation=self.coactivation, coactivation_unit=self.coactivation_unit,
                                  coactivation_probe=self.coactivation_probe,
                                  coactivation_max_share=self.coactivation_max_share),
            pool=PoolConfig(capacity_bytes=capacity_bytes, slab_tokens=self.slab_tokens, pin_memory="no"),
        )
