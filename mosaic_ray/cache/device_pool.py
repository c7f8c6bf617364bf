"""DeviceKVPool: the engine's one preallocated K/V allocation on its device, addressed by slot.

Layout (allocated once, never concatenated or grown on a GPU):
    k, v   [num_layers, num_slots, num_kv_heads, head_dim]   one token's K (after RoPE) and V
    valid  [num_layers, num_slots, num_kv_heads] bool         whether attention may read the entry

A slot is one token in every layer (nano-vllm's slot with a page size of one): a stream's sink and
window, a `full` stream's past, a question's retrieved set and its own tokens are each a list of
slots, and attention reads any mix of them through one flat index list per step (`kv_indices`),
so nothing is copied to assemble what a stream attends. `valid` is per layer and KV head because a
question's retrieved set differs per layer and head (padding entries are invalid); every other
write marks its entries valid.

Invariants: a slot is free or held by exactly one owner (a stream's resident list, a retriever, a
question's working set); allocation is all-or-nothing (`DevicePoolExhaustedError` changes nothing);
`write` then `read` of the same slots is bit-exact.

Verbs: allocate / free / write / read.
"""

from __future__ import annotations

import torch

from mosaic_ray.config import DevicePoolConfig, KVLayout
from mosaic_ray.transfer import to_device


class DevicePoolExhaustedError(MemoryError):
    """The device pool has too few free slots; nothing was allocated."""


class DeviceKVPool:
    def __init__(self, layout: KVLayout, device: torch.device | str, config: DevicePoolConfig | None = None,
                 *, growable: bool = False) -> None:
        self.layout, self.device = layout, torch.device(device)
        self.config = config or DevicePoolConfig()
        # growable: a private pool of one stand-alone StreamCache (tests, tools) doubles when full;
        # an engine's pool never grows (a GPU copy of the whole pool would double its memory).
        self.growable = growable
        self.num_slots = self._choose_capacity()
        self._allocate_storage(self.num_slots)
        # Stack of free slot ids, top at `_top - 1`; handed out from the top so a fresh pool gives
        # ascending, contiguous runs.
        self._free = torch.arange(self.num_slots - 1, -1, -1, dtype=torch.int64)
        self._top = self.num_slots

    # ------------------------------------------------------------------ sizing
    @property
    def slot_bytes(self) -> int:
        lay = self.layout
        elem = torch.empty((), dtype=lay.dtype).element_size()
        return lay.num_layers * lay.num_kv_heads * (2 * lay.head_dim * elem + 1)

    def _choose_capacity(self) -> int:
        if self.config.capacity_tokens is not None:
            return self.config.capacity_tokens
        if self.growable:
            return 1024
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * self.config.memory_fraction) // self.slot_bytes)
        return max(1, self.config.cpu_capacity_bytes // self.slot_bytes)

    def _allocate_storage(self, n: int) -> None:
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        self.k = torch.empty(L, n, H, D, dtype=self.layout.dtype, device=self.device)
        self.v = torch.empty(L, n, H, D, dtype=self.layout.dtype, device=self.device)
        self.valid = torch.zeros(L, n, H, dtype=torch.bool, device=self.device)

    def _grow(self, need: int) -> None:
        old_n, (k, v, valid) = self.num_slots, (self.k, self.v, self.valid)
        n = max(2 * old_n, old_n + need)
        self._allocate_storage(n)
        self.k[:, :old_n], self.v[:, :old_n], self.valid[:, :old_n] = k, v, valid
        fresh = torch.arange(n - 1, old_n - 1, -1, dtype=torch.int64)
        stack = torch.empty(n, dtype=torch.int64)  # room for every slot coming back
        free = torch.cat([fresh, self._free[: self._top]])
        stack[: free.numel()] = free
        self._free, self._top, self.num_slots = stack, free.numel(), n

    @property
    def free_slots(self) -> int:
        return self._top

    @property
    def used_slots(self) -> int:
        return self.num_slots - self._top

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    # ------------------------------------------------------------------ slots
    def allocate(self, n: int) -> torch.Tensor:
        """n free slots (int64, on the pool's device, ascending when the pool is fresh)."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self._top:
            if not self.growable:
                raise DevicePoolExhaustedError(
                    f"device KV pool: {n} slots asked, {self._top} of {self.num_slots} free "
                    f"({self.slot_bytes} bytes each); raise EngineConfig.kv_pool or hold fewer streams")
            self._grow(n - self._top)
        taken = self._free[self._top - n : self._top].flip(0)
        self._top -= n
        return to_device(taken, self.device)  # a copy: `_free` may change before it runs

    def free(self, slots: torch.Tensor) -> None:
        """Return slots to the pool (their contents become garbage)."""
        n = slots.numel()
        if n == 0:
            return
        if self._top + n > self.num_slots:
            raise RuntimeError("device KV pool: more slots freed than were allocated")
        self._free[self._top : self._top + n] = slots.reshape(-1).to("cpu", torch.int64).flip(0)
        self._top += n

    # ------------------------------------------------------------------ data
    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [G = layers * kv_heads, n, D] (a TokenBatch's layout) into `slots` [n]."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        n = slots.numel()
        if n == 0:
            return
        k = keys.reshape(L, H, n, D).transpose(1, 2).to(self.device, self.layout.dtype)
        v = values.reshape(L, H, n, D).transpose(1, 2).to(self.device, self.layout.dtype)
        self.k[:, slots], self.v[:, slots] = k, v
        self.valid[:, slots] = True

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [G, n, D] of `slots` [n], every layer (a copy)."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        n = slots.numel()
        k = self.k[:, slots].transpose(1, 2).reshape(L * H, n, D)
        v = self.v[:, slots].transpose(1, 2).reshape(L * H, n, D)
        return k, v

    def read_layer(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [H, n, D] of one layer."""
        return self.k[layer, slots].transpose(0, 1), self.v[layer, slots].transpose(0, 1)
