"""StreamCache: one stream's KV cache = resident sink + local window on the device, past retrieved.

    [ sink | ............ past (retriever) ............ | local window ]
      first sink_tokens      tokens that left the window    last window_tokens

`append` adds new tokens (K after RoPE, V) for every layer at once; tokens pushed out of the window
go to the retriever in one batch (so one assignment call covers all layers and heads). Device
memory is bounded by sink + window + the retriever's device part, whatever the stream's length.

Verbs: append / resident / retrieve / maintain / release.
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.retrieval import Retriever, make_retriever
from mosaic_ray.cache.token_batch import Retrieved, TokenBatch
from mosaic_ray.config import CacheConfig, KVLayout


class StreamCache:
    def __init__(self, layout: KVLayout, config: CacheConfig, pool: HostPool, device: torch.device | str) -> None:
        self.layout, self.config, self.device = layout, config, torch.device(device)
        self.retriever: Retriever = make_retriever(layout, config, pool, self.device)
        G, D, P = layout.groups, layout.head_dim, layout.pos_dims
        dt, dev = layout.dtype, self.device
        # Resident tokens, in time order: sink first, then the window.
        self.k = torch.empty(G, 0, D, dtype=dt, device=dev)
        self.v = torch.empty(G, 0, D, dtype=dt, device=dev)
        self.order = torch.empty(0, dtype=torch.int64, device=dev)
        self.time = torch.empty(0, dtype=torch.float32, device=dev)
        self.pos = torch.empty(0, P, dtype=torch.int32, device=dev)
        self.block = torch.empty(0, dtype=torch.int64, device=dev)
        self.total_tokens = 0

    @property
    def resident_tokens(self) -> int:
        return self.order.numel()

    @property
    def past_tokens(self) -> int:
        return self.retriever.past_tokens

    def budget(self) -> int:
        return self.config.budget_for(self.past_tokens)

    def append(self, batch: TokenBatch) -> int:
        """Add tokens (all layers); returns how many were offloaded to the retriever.

        All-or-nothing: if the retriever refuses (pool full), the resident state is unchanged.
        """
        batch.check(self.layout)
        dev = self.device
        k = torch.cat([self.k, batch.keys.to(dev, self.layout.dtype)], 1)
        v = torch.cat([self.v, batch.values.to(dev, self.layout.dtype)], 1)
        meta = [
            torch.cat([self.order, batch.order.to(dev, torch.int64)]),
            torch.cat([self.time, batch.time.to(dev, torch.float32)]),
            torch.cat([self.pos, batch.pos.to(dev, torch.int32)]),
            torch.cat([self.block, batch.blocks().to(dev, torch.int64)]),
        ]
        n = meta[0].numel()
        sink, window = self.config.sink_tokens, self.config.window_tokens
        evict = max(0, n - sink - window)
        if evict:
            sl = slice(min(sink, n), min(sink, n) + evict)
            self.retriever.insert(TokenBatch(k[:, sl], v[:, sl], meta[0][sl], meta[1][sl], meta[2][sl], meta[3][sl]))
            keep = torch.cat([torch.arange(0, sl.start, device=dev), torch.arange(sl.stop, n, device=dev)])
            k, v = k[:, keep], v[:, keep]
            meta = [m[keep] for m in meta]
        self.k, self.v = k, v
        self.order, self.time, self.pos, self.block = meta
        self.total_tokens += batch.size
        return evict

    def resident(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [H, R, D], v [H, R, D], pos [R, P]) of the sink + window of one layer, time order."""
        H = self.layout.num_kv_heads
        g = slice(layer * H, (layer + 1) * H)
        return self.k[g], self.v[g], self.pos

    def retrieve(self, layer: int, query: torch.Tensor, since: float | None = None, until: float | None = None) -> Retrieved:
        """The past's share for one layer: query [H, D] is the question's mean query per KV head."""
        return self.retriever.retrieve(layer, query, self.budget(), since, until)

    def select(self, layer: int, query: torch.Tensor, since: float | None = None, until: float | None = None):
        """The retriever's selection for one layer at this stream's budget (no K/V moved)."""
        return self.retriever.select(layer, query, self.budget(), since, until)

    def maintain(self, max_work: int | None = None) -> int:
        return self.retriever.maintain(max_work)

    def device_bytes(self) -> int:
        row = self.layout.head_dim * torch.empty((), dtype=self.layout.dtype).element_size()
        resident = 2 * self.resident_tokens * self.layout.groups * row
        return resident + self.retriever.device_bytes()

    def host_bytes(self) -> int:
        return self.retriever.host_bytes()

    def release(self) -> int:
        freed = self.retriever.release()
        self.__init__(self.layout, self.config, self.retriever.pool, self.device)
        return freed
