"""Question retrieval for one layer: for every question in prefill, score the past with what its
stream's `CacheConfig.scoring` asks (the mean query per KV head, or every query: `StreamCache.query_for`), fetch the chosen tokens and write them into the question's
reserved slots of the device pool (`WorkingSet.fill`), where the layer's one attention call reads
them beside the stream's resident slots.

Nothing here waits for the device: selection, the UVA gather and the counters stay on the GPU
(`StreamCache.retrieve_into`). With a prefetch (`engine/prefetch.py`) the rows a guess made one layer earlier already brought are
taken from it and only the misses are read now, so what attention sees is exactly the same.
"""

from __future__ import annotations

import time

import torch

from mosaic_ray.cache.query_set import mean_query


def question_queries(q: torch.Tensor, bounds: list[tuple[int, int]], num_kv_heads: int) -> list[torch.Tensor]:
    """Per sequence its mean query per KV head [Hkv, D] (mean over its tokens and the group's
    query heads), from q [T, Hq, D]."""
    return [mean_query(q[lo:hi], num_kv_heads) for lo, hi in bounds]


@torch.no_grad()
def retrieve_layer(ctx, layer: int, q: torch.Tensor, scale: float) -> None:
    """Fill layer `layer` of every retrieving question's working set (ctx: a StepContext; q the
    step's queries [T, Hq, D], `scale` the attention's)."""
    with torch.profiler.record_function("mosaic.retrieve_layer"):  # a label for profiles; ~1 us otherwise
        _retrieve_layer(ctx, layer, q, scale)


def _retrieve_layer(ctx, layer: int, q: torch.Tensor, scale: float) -> None:
    for i in ctx.retrieving:
        step = ctx.streams[i]
        if step.cache.past_tokens == 0:
            continue
        t0 = time.perf_counter()
        lo, hi = ctx.meta.q_bounds[i]
        query = step.cache.query_for(layer, q[lo:hi], scale)  # CacheConfig.scoring
        pre = step.prefetched.pop(layer, None)
        # select and copy on the device (rows a prefetch brought reused); counters stay there
        if step.counts is None:
            step.counts = torch.zeros(5, dtype=torch.int64, device=q.device)
        step.cache.retrieve_into(layer, query, step.work, step.counts, step.since, step.until, pre)
        if ctx.time_fetch and q.is_cuda:
            torch.cuda.synchronize()
        step.fetch_seconds += time.perf_counter() - t0
