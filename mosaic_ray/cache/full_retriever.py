"""FullRetriever: the `full` method, every past token kept on the device (the accuracy reference)."""

from __future__ import annotations

import torch

from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.retriever import Retriever, _time_mask
from mosaic_ray.cache.time_log import _grow
from mosaic_ray.cache.token_batch import Retrieved, TokenBatch


class FullRetriever(Retriever):
    """Keeps every past token on the device, in slots of the device pool: tokens leaving a stream's
    window change owner (`adopt`), nothing is copied; a question attends the slots in place
    (`past_slots`). `retrieve` returns all of them, in time order (tests, fidelity)."""

    method = "full"
    past_in_place = True

    def __init__(self, layout, config, pool, device, kv_pool: DeviceKVPool | None = None) -> None:
        super().__init__(layout, config, pool, device)
        self.kv_pool = kv_pool if kv_pool is not None else DeviceKVPool(layout, self.device, growable=True)
        dev, P = self.device, self.layout.pos_dims
        # capacity grows by doubling (`_grow`), the first `past_tokens` entries are live
        self.slots = torch.empty(0, dtype=torch.int64, device=dev)
        self.order = torch.empty(0, dtype=torch.int64, device=dev)
        self.time = torch.empty(0, dtype=torch.float32, device=dev)
        self.pos = torch.empty(0, P, dtype=torch.int32, device=dev)

    def insert(self, batch: TokenBatch) -> None:
        batch.check(self.layout)
        slots = self.kv_pool.allocate(batch.size)
        self.kv_pool.write(slots, batch.keys, batch.values)
        self.adopt(slots, batch.order, batch.time, batch.pos)

    def take_evicted(self, kv_pool, slots, order, time, pos, block, text=None) -> None:
        """The tokens stay in their slots, which become this retriever's: nothing is copied."""
        self.adopt(slots, order, time, pos)
        return None

    def adopt(self, slots: torch.Tensor, order: torch.Tensor, time: torch.Tensor, pos: torch.Tensor) -> None:
        """Take over tokens already in the device pool (their slots become this retriever's)."""
        n0, n = self.past_tokens, slots.numel()
        for name, value in (("slots", slots), ("order", order), ("time", time), ("pos", pos)):
            t = _grow(getattr(self, name), 0, n0 + n, 0)
            t.narrow(0, n0, n).copy_(value.to(self.device, t.dtype))
            setattr(self, name, t)
        self.past_tokens = n0 + n

    @property
    def k(self) -> torch.Tensor:
        """The past's keys [G, N, D], every layer (a copy out of the pool; tests and fidelity)."""
        return self.kv_pool.read(self.slots[: self.past_tokens])[0]

    def past_slots(self, since: float | None = None, until: float | None = None) -> torch.Tensor:
        """Slots of the past tokens a question may see (all, or those inside [since, until])."""
        N = self.past_tokens
        if since is None and until is None:
            return self.slots[:N]
        return self.slots[:N][_time_mask(self.time[:N], since, until)]

    def retrieve(self, layer, query, budget, since=None, until=None) -> Retrieved:
        self._check_query(layer, query)
        N, H = self.past_tokens, self.layout.num_kv_heads
        k, v = self.kv_pool.read_layer(layer, self.slots[:N])
        valid = _time_mask(self.time[:N], since, until)[None].expand(H, N)
        return Retrieved(
            keys=k, values=v, order=self.order[:N][None].expand(H, N),
            pos=self.pos[:N][None].expand(H, N, -1), valid=valid,
        )

    def device_bytes(self) -> int:
        n = self.past_tokens
        return 2 * n * self.layout.groups * self._row_bytes + n * (8 + 8 + 4 + 4 * self.layout.pos_dims)

    def export_past(self) -> dict[str, torch.Tensor]:
        N = self.past_tokens
        k, v = self.kv_pool.read(self.slots[:N])
        return {"k": k, "v": v, "order": self.order[:N].clone(), "time": self.time[:N].clone(), "pos": self.pos[:N].clone()}

    def import_past(self, tensors: dict[str, torch.Tensor]) -> None:
        self.release()
        self.insert(TokenBatch(tensors["k"], tensors["v"], tensors["order"], tensors["time"], tensors["pos"]))

    def release(self) -> int:
        self.kv_pool.free(self.slots[: self.past_tokens])
        self.__init__(self.layout, self.config, self.pool, self.device, self.kv_pool)
        return 0
