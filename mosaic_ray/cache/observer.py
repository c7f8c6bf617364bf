"""CacheObserver: a public hook on a stream cache's calls, for tools that record or measure what the
engine does (the benchmarks' recordings) without replacing its methods.

A cache calls its `observer` (None: no call, no cost but one attribute test) at three verbs:
register one per cache (`StreamCache(..., observer=)` or the `observer` attribute) or per engine
(`StreamEngine(..., cache_observer=)`: every stream cache the engine makes gets it). Subclass it
and override what you need; the others do nothing. An observer must not change the cache.
"""

from __future__ import annotations

from typing import Any

import torch

from mosaic_ray.cache.token_batch import Selection

# The StreamCache that calls (not imported: stream_cache imports this module).
StreamCache = Any


class CacheObserver:
    def on_adopt(self, cache: StreamCache, slots: torch.Tensor, order: torch.Tensor, time: torch.Tensor,
                 pos: torch.Tensor, block: torch.Tensor, text: torch.Tensor | None) -> None:
        """Called when `cache.adopt` is, before it changes anything: new tokens whose K/V are in
        `slots` of `cache.kv_pool`, with their metadata (the arguments of `adopt`)."""

    def on_maintain(self, cache: StreamCache, max_work: int | None, offload: bool) -> None:
        """Called when `cache.maintain(max_work, offload)` is, before it does its upkeep."""

    def on_retrieve(self, cache: StreamCache, layer: int, query, selection: Selection | None,
                    since: float | None, until: float | None) -> None:
        """Called after `cache.retrieve_into` filled a question's working set for `layer`, with
        its query and the selection it returned (None on a fused path that lists no rows:
        `cache.select(layer, query, since, until)` gives the same rows)."""
