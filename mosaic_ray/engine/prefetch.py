"""Cross-layer prefetch for question prefill (InfiniGen's insight, SGLang's per-layer events).

While layer l runs, layer l+1's query is predicted from layer l's attention input through layer
l+1's own q_proj and RoPE; its selection is made and its rows are gathered on a side CUDA stream.
Layer l+1 then selects with its true query and takes the rows the guess already brought; only the
misses are read from the host on the critical path (`merge_prefetched`), so answers are exactly
those without prefetch. One event per prefetched layer orders the side stream before its consumer.

Installed once per model adapter (forward pre-hooks on the decoder's attention modules); a step
opts in through `StepContext.prefetch`.
"""

from __future__ import annotations

import contextlib
import sys
from functools import partial

import torch

from mosaic_ray.attention.retrieval import question_queries
from mosaic_ray.cache.gather import Prefetched, gather
from mosaic_ray.model import attention


class Prefetcher:
    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.layers = adapter.decoder().layers
        self.stream = torch.cuda.Stream(adapter.device) if adapter.device.type == "cuda" else None
        for i, layer in enumerate(self.layers[:-1]):
            layer.self_attn.register_forward_pre_hook(partial(self._before_layer, i), with_kwargs=True)

    @classmethod
    def install(cls, adapter) -> "Prefetcher":
        if getattr(adapter, "_prefetcher", None) is None:
            adapter._prefetcher = cls(adapter)
        return adapter._prefetcher

    def _predict_query(self, layer: int, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Layer `layer`'s query from the previous layer's attention input: [b, Hq, n, D] after RoPE."""
        attn = self.layers[layer].self_attn
        b, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim).transpose(1, 2)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = position_embeddings
        return rope(q, q, cos, sin)[0]

    @torch.no_grad()
    def _before_layer(self, layer: int, module, args, kwargs) -> None:
        ctx = attention._ACTIVE.get()
        if ctx is None or not ctx.prefetch:
            return
        steps = [(i, ctx.streams[i]) for i in ctx.retrieving if ctx.streams[i].cache.past_tokens > 0]
        if not steps:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q = self._predict_query(layer + 1, hidden, kwargs["position_embeddings"])
        Hkv = self.adapter.layout.num_kv_heads
        main = torch.cuda.current_stream(hidden.device) if self.stream is not None else None
        if main is not None:
            self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            means = question_queries(q[0].transpose(0, 1), [ctx.meta.q_bounds[i] for i, _ in steps], Hkv)
            for (i, step), q_mean in zip(steps, means):
                sel = step.cache.select(layer + 1, q_mean, step.since, step.until)
                data = gather(step.cache.retriever.pool, sel.rows, step.cache.device, step.cache.retriever.host_parts)
                ready = None
                if self.stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(self.stream)
                    for t in data.values():
                        t.record_stream(main)
                step.prefetched[layer + 1] = Prefetched(sel.rows, data, ready)

