"""The retrieval configurations the needle benchmark compares (`variants.Variant`): the default
table (`BASE_VARIANTS`, `ORACLES`) and `parse_variant` for --variant."""

from __future__ import annotations

from scaling_bench.harness.variants import Variant

__all__ = ["BASE_VARIANTS", "ORACLES", "Variant", "parse_variant"]

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
