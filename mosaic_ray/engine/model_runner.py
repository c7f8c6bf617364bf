"""ModelRunner: the model, the device KV pool, and one forward per engine step.

    forward(segs, steps, kv_lists, new_slots)   eager: any mix of ingest chunks, question prefill
                                                (with retrieval) and decode, packed into one row
    prefill(ids, positions, steps, kv_lists, new_slots)
                                                text tokens only (question prefills with the decode
                                                or closing tokens of the step's other runs): a
                                                piecewise CUDA-graph replay per token bucket where
                                                it can run (`prefill_graph.py`), else `forward`
    decode(ids, positions, kv_lists, new_slots) one token per sequence: a CUDA-graph replay per
                                                batch-size bucket where it can run, else eager

Both take, per sequence, the slots it attends before this step (`kv_lists`) and the slots its new
tokens are stored into (`new_slots`); attention reads everything through one flat index list
(`attention.backend.AttentionMetadata`). A decode graph holds static input buffers (token ids,
positions, slot mapping, index list, cumulative lengths) that each step fills with a few copies,
then replays embedding -> decoder -> lm_head; padding sequences of a bucket attend one scratch
slot, and their outputs are ignored. Answers are those of the eager path (tested on a GPU).
"""

from __future__ import annotations

import logging

import torch

from mosaic_ray.attention.backend import AttentionMetadata, build_metadata
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.config import EngineConfig
from mosaic_ray.engine.prefill_graph import PrefillGraph
from mosaic_ray.engine.stream_state import Segment
from mosaic_ray.kernels.ragged_attention import choose_splits, sm_count
from mosaic_ray.model.adapter import ModelAdapter
from mosaic_ray.model.attention import AttentionObserver, StepContext, StreamStep
from mosaic_ray.transfer import to_device

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # packed tokens of a prefill graph


class ModelRunner:
    def __init__(self, adapter: ModelAdapter, kv_pool: DeviceKVPool, config: EngineConfig) -> None:
        self.adapter, self.kv_pool, self.config = adapter, kv_pool, config
        # (module, query, key, value, output, step) after each layer's retrieval attention of an
        # eager forward (`model/attention.py`: AttentionObserver); set: prefill runs eagerly
        self.attention_observer: AttentionObserver | None = None
        self.device = adapter.device
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, _DecodeGraph] = {}
        self._graph_pool = None
        self.prefill_graphs: dict[int, PrefillGraph] = {}
        self._prefill_pool = None
        self.use_prefill_graphs = self.use_graphs and config.prefill_graph_tokens > 0
        self.counters = {"graph_steps": 0, "eager_decode_steps": 0, "prefill_graph_steps": 0, "eager_prefill_steps": 0}
        # one slot padding sequences of a graph bucket write to and attend (zeros, valid)
        self.scratch = kv_pool.allocate(1)
        kv_pool.k[:, self.scratch] = 0
        kv_pool.v[:, self.scratch] = 0
        kv_pool.valid[:, self.scratch] = True

    def capture_graphs(self) -> int:
        """Capture the decode graph of every batch-size bucket and the prefill graph of every
        token bucket now (at engine start, as vLLM does), so that no answer pays a capture
        (~0.1-1 s at 7b-shape) the first time its size occurs. Returns the graphs captured."""
        if not self.use_graphs:
            return 0
        for b in GRAPH_BUCKETS:
            if b <= self.config.max_graph_batch and b + 1 <= self.config.graph_max_kv:
                self._graph_for(b, 0)
            if not self.use_graphs:  # a capture failed: eager from now on
                break
        for t in PREFILL_BUCKETS:
            if not self.use_prefill_graphs or t > self.config.prefill_graph_tokens:
                break
            self._prefill_graph_for(t)
        return len(self.graphs) + len(self.prefill_graphs)

    # ------------------------------------------------------------------ eager
    def forward(self, segs: list[Segment], steps: list[StreamStep], kv_lists: list[torch.Tensor],
                new_slots: list[torch.Tensor], logits: bool = False, dense: bool = False) -> torch.Tensor | None:
        """One decoder forward over every sequence's new tokens, packed into one row. Returns the
        logits of each sequence's last token [S, vocab] when asked, else None. `dense`: every slot
        of kv_lists is valid for every KV head (a frame ingest: `AttentionMetadata.dense`)."""
        P = self.adapter.layout.pos_dims
        embeds = torch.cat([s.embeds for s in segs])[None]  # [1, T, hidden]
        pos = torch.cat([s.positions for s in segs], 1).to(self.device)[:, None]  # [P, 1, T]
        meta = build_metadata(kv_lists, new_slots, self.device, dense=dense)
        ctx = StepContext(steps, self.kv_pool, meta, prefetch=self.config.prefetch, time_fetch=self.config.time_fetch,
                          observer=self.attention_observer)
        out = self.adapter.forward(embeds, pos.expand(P, 1, -1), ctx)
        return self._last_logits(out[0], meta) if logits else None

    def _last_logits(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Packed hidden states [T, hidden] -> logits of each sequence's last token [S, vocab]."""
        last = to_device([hi - 1 for _, hi in meta.q_bounds], self.device, torch.int64)
        return self.adapter.logits(hidden[last])

    # ------------------------------------------------------------------ prefill
    def prefill(self, ids: list[list[int]], positions: torch.Tensor, steps: list[StreamStep],
                kv_lists: list[torch.Tensor], new_slots: list[torch.Tensor]) -> torch.Tensor:
        """Text tokens of every sequence (ids[s], packed in order at `positions` [P, T] on the
        device) -> logits of each sequence's last token [S, vocab]: a prefill graph's replay
        when one fits (no prefetch, no per-layer fetch timing, no attention observer), else the eager `forward`."""
        flat = [i for x in ids for i in x]
        graph = None
        if (self.use_prefill_graphs and not self.config.prefetch and not self.config.time_fetch
                and self.attention_observer is None):
            graph = self._prefill_graph_for(len(flat))
        if graph is None:
            self.counters["eager_prefill_steps"] += 1
            sizes = [len(x) for x in ids]
            segs = [Segment(e, p, None, None, n) for e, p, n in
                    zip(self.adapter.embed_ids(flat).split(sizes), positions.split(sizes, 1), sizes)]
            return self.forward(segs, steps, kv_lists, new_slots, logits=True)
        self.counters["prefill_graph_steps"] += 1
        meta = build_metadata(kv_lists, new_slots, self.device)
        return self._last_logits(graph.run(flat, positions, StepContext(steps, self.kv_pool, meta)), meta)

    def _prefill_graph_for(self, tokens: int) -> PrefillGraph | None:
        bucket = next((t for t in PREFILL_BUCKETS if t >= tokens), None)
        if bucket is None or bucket > self.config.prefill_graph_tokens:
            return None
        if bucket not in self.prefill_graphs:
            try:
                if self._prefill_pool is None:
                    self._prefill_pool = torch.cuda.graph_pool_handle()
                self.prefill_graphs[bucket] = PrefillGraph(self.adapter, self.kv_pool, int(self.scratch), bucket,
                                                           self._prefill_pool)
            except Exception as exc:  # a model whose layers cannot be captured: prefill eagerly
                logger.warning("prefill CUDA graph capture failed (%r); prefilling eagerly", exc)
                self.use_prefill_graphs = False
                return None
        return self.prefill_graphs[bucket]

    # ------------------------------------------------------------------ decode
    def decode(self, ids: list[int], positions: torch.Tensor, steps: list[StreamStep], kv_lists: list[torch.Tensor],
               new_slots: list[torch.Tensor]) -> torch.Tensor:
        """One new token per sequence (ids [S], positions [P, S]) -> logits [S, vocab]."""
        S = len(ids)
        graph = self._graph_for(S, sum(k.numel() + 1 for k in kv_lists)) if self.use_graphs else None
        if graph is None:
            self.counters["eager_decode_steps"] += 1
            embeds = self.adapter.embed_ids(ids)  # one lookup for the batch
            chunks = [Segment(embeds[j : j + 1], positions[:, j : j + 1], None, None, 1) for j in range(len(ids))]
            return self.forward(chunks, steps, kv_lists, new_slots, logits=True)
        self.counters["graph_steps"] += 1
        return graph.run(ids, positions, kv_lists, new_slots)

    def _graph_for(self, batch: int, slots: int) -> "_DecodeGraph | None":
        bucket = next((b for b in GRAPH_BUCKETS if b >= batch and b <= self.config.max_graph_batch), None)
        if bucket is None or slots + bucket > self.config.graph_max_kv:
            return None
        if bucket not in self.graphs:
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                self.graphs[bucket] = _DecodeGraph(self, bucket)
            except Exception as exc:  # a model whose layers cannot be captured: stay eager
                logger.warning("decode CUDA graph capture failed (%r); decoding eagerly", exc)
                self.use_graphs = False
                return None
        return self.graphs[bucket]


class _DecodeGraph:
    """Static buffers and the captured decode step of one batch-size bucket."""

    def __init__(self, runner: ModelRunner, batch: int) -> None:
        ad, dev = runner.adapter, runner.device
        self.runner, self.batch = runner, batch
        P, cap = ad.layout.pos_dims, runner.config.graph_max_kv  # slots of the whole batch
        scratch = int(runner.scratch)
        self.scratch = scratch
        self.ids = torch.zeros(1, batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(P, 1, batch, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((batch,), scratch, dtype=torch.int64, device=dev)
        self.kv_indices = torch.full((cap,), scratch, dtype=torch.int64, device=dev)
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        self.cu_kv = torch.arange(batch + 1, dtype=torch.int32, device=dev)  # padding: one scratch entry each
        self.host_cu = torch.zeros(batch + 1, dtype=torch.int32, pin_memory=True)
        splits = choose_splits(batch * ad.layout.num_kv_heads, cap // batch, sm_count(dev))
        self.meta = AttentionMetadata(self.slot_mapping, self.kv_indices, self.cu_q, self.cu_kv, max_q=1,
                                      max_kv=cap // batch, q_bounds=[(i, i + 1) for i in range(batch)], splits=splits)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels compiled, workspaces allocated before capture
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of a shard (frame log, migration fingerprints) may use the GPU
        # while the engine thread captures
        with torch.cuda.graph(self.graph, pool=runner._graph_pool, capture_error_mode="thread_local"):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        ad = self.runner.adapter
        ctx = StepContext([], self.runner.kv_pool, self.meta)
        hidden = ad.forward(ad.embedding()(self.ids), self.pos, ctx)
        return ad.logits(hidden[0])

    def run(self, ids: list[int], positions: torch.Tensor, kv_lists: list[torch.Tensor],
            new_slots: list[torch.Tensor]) -> torch.Tensor:
        S, B = len(ids), self.batch
        lens = [k.numel() + 1 for k in kv_lists]
        total = sum(lens)
        cu = self.host_cu
        cu[0] = 0
        cu[1 : S + 1] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        cu[S + 1 :] = total + torch.arange(1, B - S + 1, dtype=torch.int32)
        parts = []
        for k, n in zip(kv_lists, new_slots):
            parts += [k, n]
        self.kv_indices[:total].copy_(torch.cat(parts))
        self.kv_indices[total : total + B - S].fill_(self.scratch)
        self.cu_kv.copy_(cu, non_blocking=True)
        self.slot_mapping[:S].copy_(torch.cat(new_slots))
        self.slot_mapping[S:].fill_(self.scratch)
        self.ids[0, :S].copy_(torch.tensor(ids, dtype=torch.long), non_blocking=True)
        self.ids[0, S:].zero_()
        self.pos[:, 0, :S].copy_(positions)
        self.pos[:, 0, S:].zero_()
        self.graph.replay()
        return self.logits[:S]
