"""StreamCache: one stream's KV cache = resident sink + local window in the device pool, past retrieved.

    [ sink | ............ past (retriever) ............ | staged | local window ]
      first sink_tokens      offloaded tokens             left the   last window_tokens
                                                         window

The resident tokens are slots of the engine's `DeviceKVPool` (`slots`, time order, sink first);
attention reads them in place. New tokens enter in two steps: a forward stores their K/V into slots
`reserve`d for them, then `adopt` makes them resident (or `discard` gives them back if the step
failed), so a failed step leaves the stream exactly as it was.

Tokens pushed out of the window are *staged*: they keep their slots, and questions attend them in
place, exactly, like the window (`past_slots`). Once `config.offload_batch` of them have gathered,
`maintain` (background work between engine steps) hands them to the retriever in one batch (one
assignment call covers all layers, heads and frames: `offload`), which frees their slots. Staged
tokens are never offloaded while a question holds the stream (it attends them as they were at its
start; its retrieval must not see them a second time). A stream whose maintenance falls behind
offloads inline once four batches are staged, so the device memory they take stays bounded. For
`full` the past stays in its slots anyway: tokens leaving the window change owner at once, nothing
is copied.

Counting: `past_tokens` = staged + offloaded (the budget is a share of it); a question retrieves
`retrieved_tokens()` = min(budget, offloaded) per (layer, KV head) and attends the staged ones on
top: with a budget >= the past, it attends exactly the whole past.

Verbs: reserve / adopt / discard / append / hold / unhold / resident / retrieve / maintain / offload /
release.
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.query_set import QuerySet, mean_query, query_set
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.gather import Prefetched
from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.cache.retrieval import make_retriever
from mosaic_ray.cache.retriever import Retriever
from mosaic_ray.cache.selection import time_overlap
from mosaic_ray.cache.token_batch import Retrieved, Selection, TokenBatch
from mosaic_ray.cache.working_set import WorkingSet
from mosaic_ray.config import CacheConfig, KVLayout
from mosaic_ray.transfer import to_device


class StreamCache:
    def __init__(self, layout: KVLayout, config: CacheConfig, pool: HostPool, device: torch.device | str,
                 kv_pool: DeviceKVPool | None = None, observer: CacheObserver | None = None) -> None:
        self.layout, self.config, self.device = layout, config, torch.device(device)
        self.observer = observer  # told of adopt / maintain / retrieve_into (`cache/observer.py`)
        self.kv_pool = kv_pool if kv_pool is not None else DeviceKVPool(layout, self.device, growable=True)
        self.retriever: Retriever = make_retriever(layout, config, pool, self.device, self.kv_pool)
        P, dev = layout.pos_dims, self.device
        # Resident tokens, in time order: sink first, then the window.
        self.slots = torch.empty(0, dtype=torch.int64, device=dev)
        self.order = torch.empty(0, dtype=torch.int64, device=dev)
        self.time = torch.empty(0, dtype=torch.float32, device=dev)
        self.pos = torch.empty(0, P, dtype=torch.int32, device=dev)
        self.block = torch.empty(0, dtype=torch.int64, device=dev)
        self.text = torch.empty(0, dtype=torch.bool, device=dev)  # a text segment's token (TokenBatch.text)
        self.total_tokens = 0
        # Staged tokens (left the window, not yet offloaded), chunks in time order:
        # (slots, order, time, pos, block, text) each.
        self._staged: list[tuple[torch.Tensor, ...]] = []
        self.staged_tokens = 0
        # offloads so far and the tokens they moved (inline ones in `adopt` included)
        self.offloads = self.offloaded_tokens = 0
        # Questions attending this stream's slots as they were at their start (`hold`): slots that
        # leave the window meanwhile are freed only when the last of them lets go.
        self._holds = 0
        self._held: list[torch.Tensor] = []

    @property
    def resident_tokens(self) -> int:
        return self.slots.numel()

    @property
    def past_tokens(self) -> int:
        """Tokens that left the window: staged + offloaded."""
        return self.retriever.past_tokens + self.staged_tokens

    def budget(self) -> int:
        return self.config.budget_for(self.past_tokens)

    def retrieved_tokens(self) -> int:
        """Tokens per (layer, KV head) a question retrieves into its working set: min(budget,
        offloaded); 0 when the retriever keeps the past in the device pool (`full`)."""
        if self.retriever.past_in_place:
            return 0
        return min(self.budget(), self.retriever.past_tokens)

    # ------------------------------------------------------------------ entering tokens
    def reserve(self, n: int) -> torch.Tensor:
        """Slots for n new tokens (a forward stores their K/V there); adopt or discard them."""
        return self.kv_pool.allocate(n)

    def discard(self, slots: torch.Tensor) -> None:
        self.kv_pool.free(slots)

    def adopt(self, slots: torch.Tensor, order: torch.Tensor, time: torch.Tensor, pos: torch.Tensor,
              block: torch.Tensor, text: torch.Tensor | None = None) -> int:
        """Make tokens whose K/V are in `slots` resident; returns how many left the window.

        All-or-nothing: if the retriever refuses (host pool full), the stream is unchanged and the
        slots are still the caller's."""
        if self.observer is not None:
            self.observer.on_adopt(self, slots, order, time, pos, block, text)
        dev = self.device
        n_new = slots.numel()
        if self.staged_tokens >= 4 * self.config.offload_batch and not self._holds:
            self.offload()  # maintenance fell behind: bound what waits on the device (may raise: unchanged)
        all_slots = torch.cat([self.slots, to_device(slots, dev, torch.int64)])
        meta = [
            torch.cat([self.order, to_device(order, dev, torch.int64)]),
            torch.cat([self.time, to_device(time, dev, torch.float32)]),
            torch.cat([self.pos, to_device(pos, dev, torch.int32)]),
            torch.cat([self.block, to_device(block, dev, torch.int64)]),
            torch.cat([self.text, torch.zeros(n_new, dtype=torch.bool, device=dev) if text is None
                       else to_device(text, dev, torch.bool)]),
        ]
        n = all_slots.numel()
        sink, window = self.config.sink_tokens, self.config.window_tokens
        evict = max(0, n - sink - window)
        if evict:
            sl = slice(min(sink, n), min(sink, n) + evict)
            leaving = (all_slots[sl], *(m[sl] for m in meta))
            if self.retriever.past_in_place or self.config.offload_batch <= 1:
                self._free_or_hold(self.retriever.take_evicted(self.kv_pool, *leaving))
            else:
                self._staged.append(leaving)
                self.staged_tokens += evict
            keep = torch.cat([torch.arange(0, sl.start, device=dev), torch.arange(sl.stop, n, device=dev)])
            all_slots = all_slots[keep]
            meta = [m[keep] for m in meta]
        self.slots = all_slots
        self.order, self.time, self.pos, self.block, self.text = meta
        self.total_tokens += n_new
        return evict

    def _free_or_hold(self, freed: torch.Tensor | None) -> None:
        if freed is None:
            return
        if self._holds:
            self._held.append(freed)
        else:
            self.kv_pool.free(freed)

    def _staged_parts(self) -> tuple[torch.Tensor, ...]:
        if len(self._staged) > 1:
            self._staged = [tuple(torch.cat(p) for p in zip(*self._staged))]
        return self._staged[0]

    def offload(self) -> int:
        """Hand every staged token to the retriever now, whatever their number, in one insert
        (`maintain` when a batch has gathered; snapshots and tools that read the retriever);
        returns how many.

        All-or-nothing: if the retriever refuses (host pool full) they stay staged. Refused while
        a question holds the stream (its retrieval would see them twice)."""
        if not self.staged_tokens:
            return 0
        if self._holds:
            raise RuntimeError("StreamCache.offload while a question holds the stream")
        parts = self._staged_parts()
        freed = self.retriever.take_evicted(self.kv_pool, *parts)
        n, self._staged, self.staged_tokens = self.staged_tokens, [], 0
        self.offloads, self.offloaded_tokens = self.offloads + 1, self.offloaded_tokens + n
        self._free_or_hold(freed)
        return n

    def append(self, batch: TokenBatch) -> int:
        """Add tokens whose K/V are given (all layers); returns how many were offloaded."""
        batch.check(self.layout)
        slots = self.reserve(batch.size)
        try:
            self.kv_pool.write(slots, batch.keys, batch.values)
            return self.adopt(slots, batch.order, batch.time, batch.pos, batch.blocks(), batch.text)
        except BaseException:
            self.discard(slots)
            raise

    def hold(self) -> None:
        """A question now attends the current resident slots: until `unhold`, slots leaving the
        window keep their K/V (they are freed at the last unhold), so frames may enter meanwhile."""
        self._holds += 1

    def unhold(self) -> None:
        if self._holds <= 0:
            raise RuntimeError("StreamCache.unhold without a hold")
        self._holds -= 1
        if self._holds == 0 and self._held:
            self.kv_pool.free(torch.cat(self._held))
            self._held = []

    # ------------------------------------------------------------------ reading
    def resident(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k [H, R, D], v [H, R, D], pos [R, P]) of the sink + window of one layer, time order (a copy)."""
        k, v = self.kv_pool.read_layer(layer, self.slots)
        return k, v, self.pos

    def query_for(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor | QuerySet:
        """What a question with queries q [T, Hq, D] (after RoPE) asks this stream's retriever with
        at `layer` (`CacheConfig.scoring`): its mean query [H, D], or a QuerySet normalised over
        what the question attends in place (sink, window, staged tokens)."""
        H = self.layout.num_kv_heads
        if self.config.scoring == "mean" or self.config.retrieval == "full":  # full ignores the query
            return mean_query(q, H)
        past = self.past_slots()  # the staged tokens (a `full` past never gets here)
        slots = self.slots if past is None else torch.cat([self.slots, past])
        return query_set(q, self.kv_pool.k[layer, slots].transpose(0, 1), scale, H, self.config.scoring)

    def past_slots(self, since: float | None = None, until: float | None = None) -> torch.Tensor | None:
        """Slots of the past a question attends in place (inside [since, until]): `full`'s whole
        past, or the staged tokens; None when there are none (the rest is retrieved)."""
        parts = [p for p in (self.retriever.past_slots(since, until), self._staged_slots(since, until)) if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _staged_slots(self, since: float | None, until: float | None) -> torch.Tensor | None:
        if not self.staged_tokens:
            return None
        slots, _, time, _, _, _ = self._staged_parts()
        if since is None and until is None:
            return slots
        return slots[time_overlap(time, time, since, until)]

    def retrieve(self, layer: int, query: torch.Tensor, since: float | None = None, until: float | None = None) -> Retrieved:
        """The past's share for one layer: query is the question's mean query per KV head [H, D] or
        a QuerySet (`query_for`)."""
        return self.retriever.retrieve(layer, query, self.budget(), since, until)

    def retrieve_into(self, layer: int, query: torch.Tensor, work: WorkingSet, counts: torch.Tensor,
                      since: float | None = None, until: float | None = None,
                      prefetched: Prefetched | None = None) -> Selection | None:
        """The question path: select for one layer and write the chosen tokens into the question's
        retrieved slots, without a host sync (selection and copy stay on the device; rows a
        prefetch brought are reused); the layer's counters are added to `counts` [5]
        (`retriever._device_counts`). Returns the selection's rows when they were listed."""
        sel = self.retriever.retrieve_into(layer, query, self.budget(), work, counts, since, until, prefetched)
        if self.observer is not None:
            self.observer.on_retrieve(self, layer, query, sel, since, until)
        return sel

    def select(self, layer: int, query: torch.Tensor, since: float | None = None, until: float | None = None):
        """The retriever's selection for one layer at this stream's budget (no K/V moved)."""
        return self.retriever.select(layer, query, self.budget(), since, until)

    @property
    def offload_due(self) -> bool:
        """`maintain` would offload the staged tokens now (a batch waits, no question holds them)."""
        return self.staged_tokens >= self.config.offload_batch and not self._holds

    def maintain(self, max_work: int | None = None, offload: bool = True) -> int:
        """Background upkeep between engine steps; returns units of work done (an offload of the
        staged tokens counts one, unless `offload` is False, then the retriever's, e.g. cluster
        splits, up to `max_work`)."""
        if self.observer is not None:
            self.observer.on_maintain(self, max_work, offload)
        done = 0
        if offload and self.offload_due:
            done = 1 if self.offload() else 0
        if max_work is not None:
            if max_work - done <= 0:
                return done
            return done + self.retriever.maintain(max_work - done)
        return done + self.retriever.maintain(None)

    # ------------------------------------------------------------------ accounting, lifetime
    def device_bytes(self) -> int:
        row = self.layout.head_dim * torch.empty((), dtype=self.layout.dtype).element_size()
        resident = 2 * (self.resident_tokens + self.staged_tokens) * self.layout.groups * row
        return resident + self.retriever.device_bytes()

    def host_bytes(self) -> int:
        return self.retriever.host_bytes()

    def load_resident(self, k: torch.Tensor, v: torch.Tensor, order, time, pos, block, text=None) -> None:
        """Install resident tokens (snapshot import): K/V [G, R, D] into fresh slots (text None:
        a snapshot from before text segments were marked, all frames)."""
        self.kv_pool.free(self.slots)
        slots = self.kv_pool.allocate(order.numel())
        self.kv_pool.write(slots, k, v)
        dev = self.device
        self.slots, self.order, self.time = slots, order.to(dev, torch.int64, copy=True), time.to(dev, torch.float32, copy=True)
        self.pos, self.block = pos.to(dev, torch.int32, copy=True), block.to(dev, torch.int64, copy=True)
        self.text = (torch.zeros(order.numel(), dtype=torch.bool, device=dev) if text is None
                     else text.to(dev, torch.bool, copy=True))

    def release(self) -> int:
        freed = self.retriever.release()
        self.kv_pool.free(self.slots)
        if self.staged_tokens:
            self.kv_pool.free(self._staged_parts()[0])
        if self._held:
            self.kv_pool.free(torch.cat(self._held))
        self.__init__(self.layout, self.config, self.retriever.pool, self.device, self.kv_pool)
        return freed
