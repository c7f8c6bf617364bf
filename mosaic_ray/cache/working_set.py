"""WorkingSet: what one question holds in the device pool while it is answered.

    retrieved  [B] slots: the past's selected tokens, written per layer at the question's prefill
               (different tokens in every layer and KV head; padding entries marked invalid)
    own        [R] slots reserved for the question's own tokens (prompt, answer, closing text),
               filled in order, `used` of them so far

The stream's resident slots (sink + window) and a `full` stream's past are attended in place, never
copied here. When the answer commits, the stream adopts `own[:used]` (the Q/A joins its context
like any tokens); everything else goes back to the pool. Invariant: the slots a question attends
keep their K/V until it ends, even when frames enter its stream meanwhile (the stream's cache is
held: `StreamCache.hold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_ray.cache.device_pool import DeviceKVPool


@dataclass(slots=True)
class WorkingSet:
    pool: DeviceKVPool
    retrieved: torch.Tensor
    own: torch.Tensor
    used: int = 0

    @classmethod
    def reserve(cls, pool: DeviceKVPool, retrieved: int, own: int) -> "WorkingSet":
        slots = pool.allocate(retrieved + own)  # all-or-nothing
        ws = cls(pool, slots[:retrieved], slots[retrieved:])
        if retrieved:
            pool.valid.index_fill_(1, ws.retrieved, False)  # until a layer's retrieval fills them (no host sync)
        return ws

    def next_slots(self, n: int) -> torch.Tensor:
        """Slots for the next n own tokens (taken when the step commits: `advance`)."""
        if self.used + n > self.own.numel():
            raise RuntimeError(f"question working set overflow: {self.used + n} > {self.own.numel()} reserved")
        return self.own[self.used : self.used + n]

    def advance(self, n: int) -> None:
        self.used += n

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """One layer's retrieved set: keys/values [H, W, D], valid [H, W] with W <= reserved."""
        W = keys.shape[1]
        if W > self.retrieved.numel():
            raise RuntimeError(f"retrieval returned {W} tokens per head, {self.retrieved.numel()} reserved")
        slots = self.retrieved[:W]
        p = self.pool
        p.k[layer].index_copy_(0, slots, keys.transpose(0, 1).to(p.k.dtype))
        p.v[layer].index_copy_(0, slots, values.transpose(0, 1).to(p.v.dtype))
        p.valid[layer].index_copy_(0, slots, valid.transpose(0, 1).to(torch.bool))

    def release(self, keep_own: bool = False) -> None:
        """Give the slots back; with keep_own the first `used` own slots stay allocated (adopted)."""
        self.pool.free(self.retrieved)
        self.pool.free(self.own[self.used :] if keep_own else self.own)
        self.retrieved = self.own = self.own[:0]
        self.used = 0
