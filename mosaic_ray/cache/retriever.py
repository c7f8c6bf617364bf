"""Retriever: the interface every retrieval method implements, and the fetch path they share.

A retriever holds a stream's past (tokens that left the local window) and gives a question the
part of it that matters, under a token budget per (layer, KV head). Verbs: insert / select /
fetch / fetch_into / retrieve / maintain / release (+ device_bytes / host_bytes). The methods are
in `full_retriever.py` (the past stays in the device pool) and `retrieval.py` (frame, token,
cluster: the past in the host pool), which also picks one by name.
"""

from __future__ import annotations

import abc

import torch

from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.gather import Prefetched, gather, gather_into, gather_times, merge_prefetched
from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.query_set import QuerySet, bound_logits
from mosaic_ray.cache.selection import time_overlap
from mosaic_ray.cache.token_batch import Retrieved, Selection, TokenBatch
from mosaic_ray.cache.working_set import WorkingSet
from mosaic_ray.config import CacheConfig, KVLayout


def _time_mask(time: torch.Tensor, since: float | None, until: float | None) -> torch.Tensor:
    return time_overlap(time, time, since, until)


def _finish(
    fetched: dict[str, torch.Tensor],
    rows: torch.Tensor,
    since: float | None,
    until: float | None,
    copies: int,
    bytes_moved: int,
    keys: torch.Tensor | None = None,
) -> Retrieved:
    """Mask padding and out-of-range members, then sort each head's tokens by time (valid first)."""
    valid = (rows >= 0) & _time_mask(fetched["time"], since, until)
    big = torch.iinfo(torch.int64).max
    perm = torch.argsort(fetched["order"].masked_fill(~valid, big), dim=1)
    take = lambda t: t.gather(1, perm) if t.dim() == 2 else t.gather(1, perm[..., None].expand_as(t))  # noqa: E731
    k = keys if keys is not None else fetched["k"]
    return Retrieved(
        keys=take(k), values=take(fetched["v"]), order=take(fetched["order"]), pos=take(fetched["pos"]),
        valid=take(valid), copies=copies, bytes_moved=bytes_moved,
    )


def _runs(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous host runs among rows [H, B] (-1 = none) in the order they are read, as a device
    scalar (selections list a unit's members in order, so a run is one contiguous read)."""
    starts = rows >= 0
    starts[:, 1:] &= rows[:, 1:] != rows[:, :-1] + 1
    return starts.sum()


def _device_counts(rows: torch.Tensor, valid: torch.Tensor, read: torch.Tensor, prefetched: bool) -> torch.Tensor:
    """Counters of one layer's fetch as one device tensor: [valid tokens, contiguous host runs read,
    rows read from the host, rows selected under a prefetch, of which the prefetch had brought]."""
    if rows.numel() == 0:
        return torch.zeros(5, dtype=torch.int64, device=rows.device)
    n_read = (read >= 0).sum()
    if not prefetched:
        zero = torch.zeros_like(n_read)
        return torch.stack([n_read if valid is None else valid.sum(), _runs(read), n_read, zero, zero])
    selected = (rows >= 0).sum()
    return torch.stack([valid.sum(), _runs(read), n_read, selected, selected - n_read])


def _copies_and_bytes(rows: torch.Tensor, bytes_per_row: int) -> tuple[int, int]:
    """(contiguous host runs, bytes) of a selection [H, B], with one host sync for both."""
    if rows.numel() == 0:
        return 0, 0
    runs, n = torch.stack([_runs(torch.sort(rows, dim=1).values), (rows >= 0).sum()]).tolist()
    return int(runs), int(n) * bytes_per_row


class Retriever(abc.ABC):
    method: str = ""

    def __init__(self, layout: KVLayout, config: CacheConfig, pool: HostPool, device: torch.device | str) -> None:
        self.layout, self.config, self.pool = layout, config, pool
        self.device = torch.device(device)
        self.owner = pool.register_owner()
        self.past_tokens = 0
        self._row_bytes = layout.head_dim * torch.empty((), dtype=layout.dtype).element_size()

    def groups_of(self, layer: int) -> torch.Tensor:
        H = self.layout.num_kv_heads
        return torch.arange(layer * H, (layer + 1) * H, device=self.device)

    def _check_query(self, layer: int, query: torch.Tensor | QuerySet) -> None:
        """A query is a mean query [H, D] or a QuerySet of [H, Q, D] (`cache/query_set.py`)."""
        H, D = self.layout.num_kv_heads, self.layout.head_dim
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer must be in [0, {self.layout.num_layers}), got {layer}")
        shape = tuple(query.shape)
        ok = shape == (H, D) if not isinstance(query, QuerySet) else (len(shape) == 3 and shape[0] == H and shape[2] == D)
        if not ok:
            raise ValueError(f"query: expected shape {(H, D)} or a QuerySet of ({H}, Q, {D}), got {shape}")

    @staticmethod
    def _unit_scores(query: torch.Tensor | QuerySet, reps: torch.Tensor, sizes: torch.Tensor | None = None,
                     bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                     spread: torch.Tensor | None = None) -> torch.Tensor:
        """[H, N] scores of units with keys reps [H, N, D]: query . rep for a mean query, else the
        QuerySet's normalised best estimate (sizes [H, N]: members per unit, None: one each;
        bounds (lo, hi): per-dimension key bounds, scored by the largest logit inside them;
        spread [H, N]: per-dimension key variance, `QuerySet.unit_scores`; a mean query ignores it)."""
        if isinstance(query, QuerySet):
            return query.unit_scores(reps, sizes, bounds, spread)
        if bounds is not None:
            return bound_logits(query.float()[:, None, :], *bounds).squeeze(-1)
        return torch.bmm(reps.float(), query.float()[:, :, None]).squeeze(-1)

    @abc.abstractmethod
    def insert(self, batch: TokenBatch) -> None:
        """Take tokens that left the local window (all layers at once)."""

    def take_evicted(self, kv_pool: DeviceKVPool, slots: torch.Tensor, order: torch.Tensor, time: torch.Tensor,
                     pos: torch.Tensor, block: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor | None:
        """Take tokens leaving a stream's window whose K/V are in device-pool `slots`. Here: their
        K/V are read out and inserted, and the slots are returned for the caller to free (a
        retriever that keeps its past in the pool takes the slots over instead and returns None)."""
        k, v = kv_pool.read(slots)
        self.insert(TokenBatch(k, v, order, time, pos, block, text))
        return slots

    def past_slots(self, since: float | None = None, until: float | None = None) -> torch.Tensor | None:
        """Slots of the past a question attends in place, when it lives in the device pool; None
        when it is retrieved into the question's working set (every method but `full`)."""
        return None

    # True when the past stays in the device pool and questions attend it in place (`full`)
    past_in_place = False

    # what the host pool supplies for a selected row: K and V, or V only (token keeps K on the device)
    host_parts = "kv"

    def select(
        self, layer: int, query: torch.Tensor, budget: int, since: float | None = None, until: float | None = None
    ) -> Selection:
        """Choose the past tokens for one layer: query [H, D] is the question's mean query per KV
        head, after RoPE. Reads only device metadata; moves no K/V."""
        raise NotImplementedError(f"{self.method} retrieval has no separate selection")

    def fetch(self, sel: Selection, since: float | None = None, until: float | None = None,
              prefetched: Prefetched | None = None) -> Retrieved:
        """Move the selected rows to the device. Rows already brought by `prefetched` (a guess made
        a layer earlier) are taken from it; only the misses are read from the host now."""
        fetched, misses = self._gather(sel, prefetched)
        per_row = self._row_bytes * len(self.host_parts)
        copies, moved = _copies_and_bytes(misses, per_row)
        out = _finish(fetched, sel.rows, since, until, copies, moved, keys=self._device_keys(sel))
        out.misses = moved // per_row
        return out

    def _device_keys(self, sel: Selection) -> torch.Tensor | None:
        return None

    def _gather(self, sel: Selection, prefetched: Prefetched | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the selected rows on the device, the rows read from the host for them)."""
        if prefetched is None:
            return gather(self.pool, sel.rows, self.device, self.host_parts), sel.rows
        return merge_prefetched(self.pool, sel.rows, self.device, self.host_parts, prefetched)

    def fetch_into(self, sel: Selection, work: WorkingSet, since: float | None = None,
                   until: float | None = None, prefetched: Prefetched | None = None) -> torch.Tensor:
        """Move the selected rows straight into the question's retrieved slots for `sel.layer`,
        with no host synchronization (attention does not need them in time order). Rows a prefetch
        brought are taken from it, only the misses are read from the host now. Returns the device
        counters of `_device_counts`."""
        if prefetched is not None:
            fetched, read = self._gather(sel, prefetched)
            keys = self._device_keys(sel)
            valid = (sel.rows >= 0) & _time_mask(fetched["time"], since, until)
            work.fill(sel.layer, fetched["k"] if keys is None else keys, fetched["v"], valid)
            return _device_counts(sel.rows, valid, read, True)
        # the common path: one launch moves the rows into the slots and marks them valid
        kv, layer, W = work.pool, sel.layer, sel.rows.shape[1]
        slots = work.retrieved[:W]
        if W > work.retrieved.numel():
            raise RuntimeError(f"retrieval returned {W} tokens per head, {work.retrieved.numel()} reserved")
        keys = self._device_keys(sel)
        gather_into(self.pool, sel.rows, kv.k[layer] if keys is None else None, kv.v[layer], slots, kv.valid[layer])
        if keys is not None:
            kv.k[layer].index_copy_(0, slots, keys.transpose(0, 1).to(kv.k.dtype))
        valid = None
        if since is not None or until is not None:  # members outside the range stay out
            valid = (sel.rows >= 0) & _time_mask(gather_times(self.pool, sel.rows, self.device), since, until)
            kv.valid[layer].index_copy_(0, slots, valid.transpose(0, 1))
        return _device_counts(sel.rows, valid, sel.rows, False)

    def retrieve_into(self, layer: int, query: torch.Tensor, budget: int, work: WorkingSet, counts: torch.Tensor,
                      since: float | None = None, until: float | None = None,
                      prefetched: Prefetched | None = None) -> Selection | None:
        """The question path: select for one layer and write the chosen tokens into the question's
        retrieved slots, adding the layer's counters to `counts` [5] (`_device_counts`), all on
        the device. Returns the selection when it was made as rows (None when a method moved its
        tokens without listing them)."""
        sel = self.select(layer, query, budget, since, until)
        counts += self.fetch_into(sel, work, since, until, prefetched)
        return sel

    def retrieve(
        self, layer: int, query: torch.Tensor, budget: int, since: float | None = None, until: float | None = None
    ) -> Retrieved:
        """select + fetch: the selected past tokens of one layer on the device, in time order."""
        return self.fetch(self.select(layer, query, budget, since, until), since, until)

    def maintain(self, max_work: int | None = None) -> int:
        """Deferred upkeep off the query path; returns work done (0 when there is none)."""
        return 0

    @abc.abstractmethod
    def device_bytes(self) -> int:
        """Device memory this stream's past costs (K/V kept on the device, or index metadata)."""

    def host_bytes(self) -> int:
        return self.pool.owned_slabs(self.owner) * self.pool.slab_bytes

    def release(self) -> int:
        """Free everything of this stream; returns slabs freed."""
        self.past_tokens = 0
        return self.pool.release_owner(self.owner)
