"""TimeLog: a stream's offloaded tokens in time order in the host pool (frame and token baselines).

Token i (i-th offloaded token of the stream) of group g lives at row
`slabs[g, i // S] * S + i % S`, so a frame block is one contiguous run per slab it spans and a
token is one row. Per-token metadata every group shares (order, time, pos, block) stays on the
device: selection reads it without touching the host.

Verbs: append / rows / release.
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import KVLayout


def _grow(t: torch.Tensor, dim: int, needed: int, fill) -> torch.Tensor:
    """Return `t` with at least `needed` entries along `dim` (capacity doubles; new entries = fill)."""
    if t.shape[dim] >= needed:
        return t
    shape = list(t.shape)
    shape[dim] = max(needed, 2 * t.shape[dim], 16)
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class TimeLog:
    def __init__(self, layout: KVLayout, pool: HostPool, owner: int, device: torch.device) -> None:
        self.layout, self.pool, self.owner, self.device = layout, pool, owner, device
        self.S = pool.slab_tokens
        G, P = layout.groups, layout.pos_dims
        self.size = 0
        self.slabs = torch.full((G, 0), -1, dtype=torch.int64, device=device)
        self.order = torch.empty(0, dtype=torch.int64, device=device)
        self.time = torch.empty(0, dtype=torch.float32, device=device)
        self.pos = torch.empty(0, P, dtype=torch.int32, device=device)
        self.block = torch.empty(0, dtype=torch.int64, device=device)

    def append(self, batch: TokenBatch) -> torch.Tensor:
        """Store the batch after the tokens already logged; returns their token indices [n].

        All-or-nothing: slabs are reserved before anything is written.
        """
        batch.check(self.layout)
        G, n, D = batch.keys.shape
        first, last = self.size, self.size + n
        have = -(-first // self.S)
        need = -(-last // self.S)
        new = self.pool.allocate(G * (need - have), self.owner).view(G, need - have).to(self.device)
        self.slabs = _grow(self.slabs, 1, need, -1)
        self.slabs[:, have:need] = new
        idx = torch.arange(first, last, device=self.device)
        rows = self.rows(idx[None, :].expand(G, n), torch.arange(G, device=self.device))
        pos = batch.pos[None].expand(G, n, batch.pos.shape[1])
        self.pool.write(
            rows.flatten(), batch.keys.reshape(G * n, D), batch.values.reshape(G * n, D),
            batch.order[None].expand(G, n).flatten(), batch.time[None].expand(G, n).flatten(),
            pos.reshape(G * n, -1),
        )
        for name, value in (("order", batch.order), ("time", batch.time), ("pos", batch.pos), ("block", batch.blocks())):
            t = _grow(getattr(self, name), 0, last, 0)
            t[first:last] = value.to(self.device, t.dtype)
            setattr(self, name, t)
        self.size = last
        return idx

    def rows(self, token_idx: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Pool rows of token indices [H, B] (-1 = none) in groups [H]."""
        safe = token_idx.clamp(min=0)
        slab = self.slabs[groups[:, None], safe // self.S]
        return torch.where(token_idx >= 0, slab * self.S + safe % self.S, -1)

    def release(self) -> int:
        freed = self.pool.release_owner(self.owner)
        self.__init__(self.layout, self.pool, self.owner, self.device)
        return freed
