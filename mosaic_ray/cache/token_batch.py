"""Plain data passed between the stream cache and its retrieval structures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_ray.config import KVLayout


@dataclass(slots=True)
class TokenBatch:
    """Tokens leaving the local window, for every (layer, KV head) group at once.

    keys, values: [G, n, D] (keys as attention sees them, i.e. after RoPE)
    order: [n] int64 stream token index; time: [n] float32 seconds; pos: [n, P] int32
    block: [n] int64 frame (or text segment) the token came from, non-decreasing; None = one
        block per `order // 64` (only the frame baseline reads it)
    text: [n] bool, True for a token of a text segment (a caption, a Q/A turn), False for a frame's
        (its markers included); None = no text (cluster retrieval keeps text segments as units
        of their own: `ClusterIndex`)
    """

    keys: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    time: torch.Tensor
    pos: torch.Tensor
    block: torch.Tensor | None = None
    text: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.order.numel()

    def blocks(self) -> torch.Tensor:
        return self.block if self.block is not None else self.order // 64

    def texts(self) -> torch.Tensor:
        return self.text if self.text is not None else torch.zeros(self.size, dtype=torch.bool, device=self.order.device)

    def check(self, layout: KVLayout) -> None:
        G, D, P = layout.groups, layout.head_dim, layout.pos_dims
        n = self.order.numel()
        for name, t, shape in (("keys", self.keys, (G, n, D)), ("values", self.values, (G, n, D))):
            if tuple(t.shape) != shape:
                raise ValueError(f"TokenBatch.{name}: expected shape {shape}, got {tuple(t.shape)}")
        if tuple(self.time.shape) != (n,) or tuple(self.pos.shape) != (n, P):
            raise ValueError(
                f"TokenBatch: time/pos expected {(n,)}/{(n, P)}, got "
                f"{tuple(self.time.shape)}/{tuple(self.pos.shape)}"
            )
        if self.text is not None and (tuple(self.text.shape) != (n,) or self.text.dtype != torch.bool):
            raise ValueError(f"TokenBatch.text: expected bool {(n,)}, got {self.text.dtype} {tuple(self.text.shape)}")
        if self.keys.dtype != self.values.dtype or not self.keys.is_floating_point():
            raise ValueError(f"TokenBatch: keys/values must share a float dtype, got {self.keys.dtype}/{self.values.dtype}")



def ranks_within(keys: torch.Tensor) -> torch.Tensor:
    """For each entry, how many earlier entries share its key (0 for the first occurrence)."""
    if keys.numel() == 0:
        return keys.clone()
    sorted_keys, perm = torch.sort(keys, stable=True)
    idx = torch.arange(keys.numel(), device=keys.device)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    # where each entry's run of equal keys starts: the running max of run starts (no host sync)
    run_start = torch.where(first, idx, torch.zeros_like(idx)).cummax(0).values
    rank_sorted = idx - run_start
    ranks = torch.empty_like(rank_sorted)
    ranks[perm] = rank_sorted
    return ranks


@dataclass(slots=True)
class Retrieved:
    """What one layer's retrieval hands to attention, on the compute device.

    keys, values: [H, B, D] (keys after RoPE, as stored); order: [H, B] int64; pos: [H, B, P];
    valid: [H, B] bool. Valid entries come first in each head and are sorted by `order` (time).
    copies: contiguous host runs read (copy operations of a run-per-copy gather);
    bytes_moved: host-to-device bytes.
    """

    keys: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    copies: int = 0
    bytes_moved: int = 0
    misses: int = 0  # selected rows read from the host on the critical path (not prefetched)

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())


@dataclass(slots=True)
class Selection:
    """One layer's chosen past tokens: pool rows [H, B] (-1 = none), valid ones first per head;
    `idx` [H, B] are token indices when the method keeps keys on the device (token)."""

    layer: int
    rows: torch.Tensor
    idx: torch.Tensor | None = None
