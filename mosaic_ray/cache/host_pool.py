"""HostPool: the shard's one pinned host allocation for offloaded K/V, carved into slabs.

Layout (one tensor, allocated and pinned once):
    kv[num_slabs, 2, slab_tokens, head_dim]   K rows then V rows of one (layer, KV head) group
plus per-row metadata in plain host tensors:
    order[num_slabs, slab_tokens]  int64   the token's index in its stream (time order)
    time [num_slabs, slab_tokens]  float32 the token's timestamp in seconds
    pos  [num_slabs, slab_tokens, P] int32 the position its key was rotated with (P = 1 or 3)

A row is addressed by `slab * slab_tokens + offset`. A slab belongs to one owner (a stream) and
holds rows of one unit (a cluster, or a time-ordered run for frame/token retrieval), so the K of a
unit's members are one contiguous run per slab: one copy per run, or one UVA read per row.

Invariants: a slab is either free or owned by exactly one owner; allocation is all-or-nothing
(a request the pool cannot serve raises PoolExhaustedError and changes nothing); what `read`
returns is bit-exact with what `write` stored.

Writes from a GPU: rows given as a CUDA tensor (with a pinned pool) are written by the GPU itself
through UVA views of the pinned memory, in the order of the current CUDA stream: no host sync and
no staging copy on the ingest path. Readers on the GPU (the gather kernels, on that stream or one
that waits on it) see them in order; host-side readers (`read`, snapshots) call `sync` first, which
waits only when device writes are outstanding.

Generations (incremental snapshots, `engine/snapshot_delta.py`): `gen[slab]` is the pool's
`epoch` at the slab's last change. A slab's bytes change only through `allocate` and `write`
(and `free`, after which no stream owns it), and each of them stamps a new epoch on the slabs it
touches; so "the slabs of a stream with gen > e" are exactly those that may differ from what they
held when the pool's epoch was e. A split rewrites a cluster's members in place (`splitter.py`):
those are `write`s, stamped like any other.

Verbs: allocate / free / release_owner / write / read / sync (+ changed_since).
"""

from __future__ import annotations

import psutil
import torch

from mosaic_ray.config import DENSE_SLAB_TOKENS, KVLayout, PoolConfig


class PoolExhaustedError(MemoryError):
    """The pool has too few free slabs; the caller's state is unchanged."""


class HostPool:
    def __init__(self, layout: KVLayout, config: PoolConfig | None = None) -> None:
        self.layout = layout
        self.config = config or PoolConfig()
        self.slab_tokens = self.config.slab_tokens or DENSE_SLAB_TOKENS
        self.slab_bytes = self._slab_bytes(layout, self.slab_tokens)
        capacity = self._choose_capacity()
        self.num_slabs = max(1, capacity // self.slab_bytes)
        self.pinned = self._want_pinned()
        S, D, P = self.slab_tokens, layout.head_dim, layout.pos_dims
        self.kv = torch.empty((self.num_slabs, 2, S, D), dtype=layout.dtype, pin_memory=self.pinned)
        # metadata is pinned too: on a GPU it is read in place (UVA) with the rows' K/V
        self.order = torch.full((self.num_slabs, S), -1, dtype=torch.int64, pin_memory=self.pinned)
        self.time = torch.zeros((self.num_slabs, S), dtype=torch.float32, pin_memory=self.pinned)
        self.pos = torch.zeros((self.num_slabs, S, P), dtype=torch.int32, pin_memory=self.pinned)
        self._device_views: dict[str, dict[str, torch.Tensor]] = {}
        self.owner = torch.full((self.num_slabs,), -1, dtype=torch.int32)
        # pinned as the rows are: a GPU write stamps its slabs through a UVA view, with no host sync
        self.gen = torch.zeros((self.num_slabs,), dtype=torch.int64, pin_memory=self.pinned)
        self.epoch = 0
        # Stack of free slab ids; the top is at `_free_top - 1`. Slabs are handed out from the
        # top, so a batch of new slabs is usually a run of consecutive ids.
        self._free = torch.arange(self.num_slabs - 1, -1, -1, dtype=torch.int64)
        self._free_top = self.num_slabs
        self._next_owner = 0
        self._written_from: torch.device | None = None  # a device with GPU writes not yet waited for

    # ------------------------------------------------------------------ sizing
    @staticmethod
    def _slab_bytes(layout: KVLayout, slab_tokens: int) -> int:
        elem = torch.empty((), dtype=layout.dtype).element_size()
        kv = 2 * slab_tokens * layout.head_dim * elem
        meta = slab_tokens * (8 + 4 + 4 * layout.pos_dims) + 4
        return kv + meta

    def _choose_capacity(self) -> int:
        available = psutil.virtual_memory().available
        cfg = self.config
        wanted = cfg.capacity_bytes if cfg.capacity_bytes is not None else int(cfg.ram_fraction * available)
        limit = int(cfg.max_ram_fraction * available)
        if wanted > limit:
            raise ValueError(
                f"HostPool: asked for {wanted / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of RAM "
                f"is free and the pool may take at most max_ram_fraction={cfg.max_ram_fraction} of it "
                f"({limit / 2**30:.2f} GiB); lower PoolConfig.capacity_bytes or ram_fraction"
            )
        if wanted < self.slab_bytes:
            raise ValueError(
                f"HostPool: capacity {wanted} bytes is smaller than one slab ({self.slab_bytes} bytes)"
            )
        return wanted

    def _want_pinned(self) -> bool:
        mode = self.config.pin_memory
        if mode == "no":
            return False
        has_cuda = torch.cuda.is_available()
        if mode == "yes" and not has_cuda:
            raise ValueError("PoolConfig.pin_memory='yes' needs a CUDA device; use 'auto' or 'no'")
        return has_cuda

    def device_views(self, device: torch.device) -> dict[str, torch.Tensor]:
        """CUDA tensors aliasing the pinned storage (kv, order, time, pos): indexed on the device, each
        element read or written is a PCIe access; no host sync, no staging copy."""
        key = str(device)
        if key not in self._device_views:
            from mosaic_ray.kernels.uva import device_view

            self._device_views[key] = {n: device_view(getattr(self, n), device)
                                       for n in ("kv", "order", "time", "pos", "gen")}
        return self._device_views[key]

    def sync(self) -> None:
        """Wait for the GPU writes issued so far (before reading the pool on the host)."""
        if self._written_from is not None:
            torch.cuda.current_stream(self._written_from).synchronize()
            self._written_from = None

    # ------------------------------------------------------------------ ownership
    def register_owner(self) -> int:
        """A new owner id (one per stream); its slabs are released together by `release_owner`."""
        self._next_owner += 1
        return self._next_owner

    @property
    def free_slabs(self) -> int:
        return self._free_top

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_bytes

    @property
    def used_bytes(self) -> int:
        return (self.num_slabs - self._free_top) * self.slab_bytes

    def owned_slabs(self, owner: int) -> int:
        return int((self.owner == owner).sum())

    def can_allocate(self, n: int) -> bool:
        return n <= self._free_top

    def allocate(self, n: int, owner: int) -> torch.Tensor:
        """Take `n` free slabs for `owner`; int64 ids. Raises PoolExhaustedError, changing nothing."""
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > self._free_top:
            raise PoolExhaustedError(
                f"HostPool full: need {n} slabs of {self.slab_bytes} B, {self._free_top} of "
                f"{self.num_slabs} free ({self.capacity_bytes / 2**30:.2f} GiB pool); close streams or "
                f"raise PoolConfig.capacity_bytes"
            )
        top = self._free_top
        ids = self._free[top - n : top].flip(0).clone()
        self._free_top = top - n
        self.owner[ids] = owner
        self._stamp(ids)  # a slab handed out holds whatever it held: new to its owner
        return ids

    def _stamp(self, slab_ids: torch.Tensor) -> None:
        """A new epoch on `slab_ids`. With GPU writes in flight the stamp is written in their
        stream's order (as `free` writes `order`): a late GPU write's older stamp must not land
        after this one and hide the change from the next delta."""
        self.epoch += 1
        if self._written_from is not None:
            dev = self._written_from
            self.device_views(dev)["gen"][slab_ids.to(dev)] = self.epoch
        else:
            self.gen[slab_ids] = self.epoch

    def changed_since(self, slab_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        """The slabs among `slab_ids` changed after the pool's epoch was `epoch` (call `sync` first
        when GPU writes may be in flight: their stamps land with them)."""
        slab_ids = slab_ids.to(torch.int64).cpu()
        return slab_ids[self.gen[slab_ids] > epoch]

    def free(self, slab_ids: torch.Tensor) -> None:
        """Return slabs to the free stack. Freeing a slab that is already free is a bug: raise."""
        slab_ids = slab_ids.to(torch.int64).flatten().cpu()
        if slab_ids.numel() == 0:
            return
        if bool((self.owner[slab_ids] < 0).any()) or slab_ids.unique().numel() != slab_ids.numel():
            raise RuntimeError("HostPool.free: slab freed twice")
        self.owner[slab_ids] = -1
        if self._written_from is not None:  # after the GPU's writes in flight, in their stream's order
            self.device_views(self._written_from)["order"][slab_ids.to(self._written_from)] = -1
        else:
            self.order[slab_ids] = -1
        n = slab_ids.numel()
        self._free[self._free_top : self._free_top + n] = slab_ids
        self._free_top += n

    def release_owner(self, owner: int) -> int:
        """Free every slab of `owner` (stream close); returns how many were freed."""
        ids = (self.owner == owner).nonzero().flatten()
        self.free(ids)
        return int(ids.numel())

    # ------------------------------------------------------------------ data
    def _split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.to(torch.int64).cpu()
        return rows // self.slab_tokens, rows % self.slab_tokens

    def write(
        self,
        rows: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        order: torch.Tensor,
        time: torch.Tensor,
        pos: torch.Tensor,
    ) -> None:
        """Store n rows. rows [n] int; k, v [n, head_dim]; order [n]; time [n]; pos [n, P].

        Rows on a CUDA device (and a pinned pool): the GPU writes them in place, asynchronously
        (see the module doc); the caller must have allocated their slabs (not re-checked there:
        that would be a host sync)."""
        n = rows.numel()
        D, P = self.layout.head_dim, self.layout.pos_dims
        for name, t, shape in (("k", k, (n, D)), ("v", v, (n, D)), ("pos", pos, (n, P))):
            if tuple(t.shape) != shape:
                raise ValueError(f"HostPool.write: {name} shape expected {shape}, got {tuple(t.shape)}")
        if order.numel() != n or time.numel() != n:
            raise ValueError(f"HostPool.write: order/time need {n} entries, got {order.numel()}/{time.numel()}")
        if rows.is_cuda and self.pinned:
            self._write_from_device(rows, k, v, order, time, pos)
            return
        slab, off = self._split_rows(rows)
        if n and bool((self.owner[slab] < 0).any()):
            raise RuntimeError("HostPool.write: row in a free slab")
        self.kv[slab, 0, off] = k.to(device="cpu", dtype=self.layout.dtype)
        self.kv[slab, 1, off] = v.to(device="cpu", dtype=self.layout.dtype)
        self.order[slab, off] = order.to(device="cpu", dtype=torch.int64)
        self.time[slab, off] = time.to(device="cpu", dtype=torch.float32)
        self.pos[slab, off] = pos.to(device="cpu", dtype=torch.int32)
        self._stamp(slab)

    def _write_from_device(self, rows, k, v, order, time, pos) -> None:
        dev = rows.device
        views = self.device_views(dev)
        rows = rows.to(torch.int64)
        slab, off = rows // self.slab_tokens, rows % self.slab_tokens
        kv = views["kv"]
        kv[slab, 0, off] = k.to(dev, self.layout.dtype)
        kv[slab, 1, off] = v.to(dev, self.layout.dtype)
        views["order"][slab, off] = order.to(dev, torch.int64)
        views["time"][slab, off] = time.to(dev, torch.float32)
        views["pos"][slab, off] = pos.to(dev, torch.int32)
        self._written_from = dev
        self._stamp(slab)

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k [n, D], v [n, D], order [n], time [n], pos [n, P]) of the given rows, on the host."""
        self.sync()
        slab, off = self._split_rows(rows)
        return (
            self.kv[slab, 0, off],
            self.kv[slab, 1, off],
            self.order[slab, off],
            self.time[slab, off],
            self.pos[slab, off],
        )
