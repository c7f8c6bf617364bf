"""The retrieval configurations the needle benchmark compares (`Variant`: a method and its cluster
knobs), the default table (`BASE_VARIANTS`, `ORACLES`) and `parse_variant` for --variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mosaic_ray.config import CacheConfig, ClusterConfig, PoolConfig

if TYPE_CHECKING:
    from scaling_bench.harness.needle_settings import Settings

_CLUSTER = ClusterConfig()  # the engine's defaults
_CACHE = CacheConfig()


@dataclass(slots=True)
class Variant:
    """One retrieval configuration: a method plus the cluster knobs it runs with."""

    name: str
    method: str
    variance_ratio: float = _CLUSTER.variance_ratio
    split_size: int = _CLUSTER.split_size
    # Oracle: retrieve only the past within this many seconds of the needle asked about (the
    # question's since/until), so the model sees the needle whole and little else.
    oracle_s: float | None = None
    scoring: str = _CACHE.scoring  # CacheConfig.scoring / fill (the engine's defaults)
    fill: str = _CACHE.fill
    text_units: bool = _CLUSTER.text_units
    representative: str = _CLUSTER.representative
    coactivation: float = _CLUSTER.coactivation

    def cache_config(self, s: "Settings", budget: float) -> CacheConfig:
        return CacheConfig(
            retrieval=self.method, sink_tokens=s.sink, window_tokens=s.window, budget_ratio=budget,
            scoring=self.scoring, fill=self.fill,
            offload_batch=1,  # the budget is measured over the whole past: nothing waits staged
            cluster=ClusterConfig(variance_ratio=self.variance_ratio, split_size=self.split_size,
                                  max_size=max(_CLUSTER.max_size, 2 * self.split_size), text_units=self.text_units,
                                  representative=self.representative, coactivation=self.coactivation),
            pool=PoolConfig(capacity_bytes=1 << 20, pin_memory="no"),  # streams live in the engine's pool
        )


BASE_VARIANTS = [Variant("full", "full"), Variant("frame", "frame"), Variant("token", "token"),
                 Variant("cluster", "cluster")]
# `oracle`: exact top-B by true attention per (layer, KV head), same budget (token retrieval by the
# prefill's attention mass, `CacheConfig.scoring="mass"`; kept while the answer decodes, as every
# method's selection is). `near-needle`: full within the needle's time +-1 s: the needle whole.
ORACLES = [Variant("oracle", "token", scoring="mass"), Variant("near-needle", "full", oracle_s=1.0)]


def parse_variant(spec: str) -> Variant:
    """'cluster:vr=0.05,split=32' -> a variant named 'cluster vr=0.05 split=32'. Knobs: vr, split,
    text=on|off, rep and coact (cluster: ClusterConfig), scoring=mean|max and fill=prefix|skip (frame, token,
    cluster: CacheConfig)."""
    method, _, knobs = spec.partition(":")
    if method not in ("frame", "token", "cluster") or not knobs:
        raise ValueError(f"extra variants are <frame|token|cluster>:<knobs>, e.g. cluster:vr=0.05,split=32; got {spec!r}")
    v = Variant(method + " " + knobs.replace(",", " "), method)
    for knob in knobs.split(","):
        key, _, value = knob.partition("=")
        if key == "vr" and method == "cluster":
            v.variance_ratio = float(value)
        elif key == "split" and method == "cluster":
            v.split_size = int(value)
        elif key in ("scoring", "fill"):  # checked by CacheConfig when the variant's cache is made
            setattr(v, key, value)
        elif key == "text" and method == "cluster" and value in ("on", "off"):
            v.text_units = value == "on"
        elif key == "rep" and method == "cluster":  # centroid | bound, checked by ClusterConfig
            v.representative = value
        elif key == "coact" and method == "cluster":  # ClusterConfig.coactivation
            v.coactivation = float(value)
        else:
            raise ValueError(f"unknown knob {key!r} for {method} in {spec!r} (known: vr, split, text=on|off, rep, coact, scoring, fill)")
    return v
