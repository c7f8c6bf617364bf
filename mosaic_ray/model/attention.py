"""Retrieval attention: the hook that lets transformers' own decoder layers attend over every
stream of a step at once, through the device KV pool.

transformers 5.x decoder attention projects q/k/v, applies RoPE, calls
`past_key_values.update(k, v, layer_idx)`, then the function registered under our attention
implementation name. We pass a `StepContext` as `past_key_values`: `update` stores the step's new
K/V (after RoPE) into their slots of the pool (`attention.backend.store_kv`); the attention function
first fills the retrieved slots of questions in prefill for this layer (`attention.retrieval`), then
makes one ragged attention call over every sequence's slots. No model code is re-implemented.

The step's tokens are packed: the decoder sees one row [1, T] holding each sequence's new tokens
back to back (`AttentionMetadata.q_bounds`).

While a question prefill's piecewise CUDA graph is captured (`engine/prefill_graph.py`), the
context carries a `layer_break`: the attention function hands it the layer's queries and returns
the buffer it names, so that retrieval and the ragged attention run eagerly between graph pieces.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mosaic_ray.attention import backend
from mosaic_ray.attention.backend import AttentionMetadata
from mosaic_ray.attention.retrieval import retrieve_layer
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.working_set import WorkingSet

ATTENTION_NAME = "mosaic_retrieval"
_ACTIVE: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("mosaic_step", default=None)


@dataclass(slots=True)
class StreamStep:
    """One sequence's part of a batched forward step.

    new_tokens: its new tokens in the step (packed in `AttentionMetadata.q_bounds` order).
    retrieve: fill the working set's retrieved slots at each layer (question prefill).
    work: the question's working set (None for ingest).
    """

    cache: StreamCache
    new_tokens: int
    retrieve: bool = False
    since: float | None = None
    until: float | None = None
    work: WorkingSet | None = None
    # host time this stream's retrieval took in the forward (with EngineConfig.time_fetch: device time too)
    fetch_seconds: float = 0.0
    # layer -> rows gathered ahead by the Prefetcher, consumed by that layer's retrieval
    prefetched: dict = field(default_factory=dict)
    # device counters of the retrieval (`retriever._device_counts`), summed over layers
    counts: torch.Tensor | None = None

    def fetch_moved(self, row_bytes: int) -> torch.Tensor | None:
        """[tokens, copies, bytes] the retrieval moved, summed over layers, as a device tensor (no
        host sync: an engine adds it up and reads it when asked); None when it retrieved nothing."""
        c = self.counts
        return None if c is None else torch.stack([c[0], c[1], c[2] * row_bytes])

    def fetch_stats(self, row_bytes: int) -> dict[str, float]:
        """What the retrieval moved, summed over layers: {"tokens", "copies", "bytes", "rows",
        "prefetch_hits", "seconds"} (one host sync, when the answer is read)."""
        tokens, runs, read, rows, hits = self.counts.tolist() if self.counts is not None else (0, 0, 0, 0, 0)
        return {"tokens": tokens, "copies": runs, "bytes": read * row_bytes, "rows": rows, "prefetch_hits": hits,
                "seconds": self.fetch_seconds}


class AttentionObserver(Protocol):
    """A public hook on the retrieval attention (`ModelRunner.attention_observer`, or
    `StreamEngine(..., attention_observer=)`): called after each decoder layer's attention of an
    eager forward with the layer `module` (`module.layer_idx`), its `query` [1, Hq, T, D] (after
    RoPE), `key` / `value` [1, Hkv, T, D] (the step's new tokens), `output` [1, T, Hq, D] and the
    step's `StepContext` (`step.streams`: which sequences, how many new tokens, retrieving or not).
    None registered: no call. It must not change the tensors."""

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 output: torch.Tensor, step: "StepContext") -> None: ...


class StepContext:
    """Passed to the decoder as `past_key_values`: stores new K/V by slot and serves attention."""

    def __init__(self, streams: list[StreamStep], pool: DeviceKVPool, meta: AttentionMetadata,
                 prefetch: bool = False, time_fetch: bool = False, layer_break=None,
                 observer: AttentionObserver | None = None) -> None:
        self.streams, self.pool, self.meta = streams, pool, meta
        self.prefetch, self.time_fetch, self.observer = prefetch, time_fetch, observer
        # (layer, queries [T, Hq, D], scale) -> the attention output buffer: while a piecewise
        # CUDA graph is captured (`engine/prefill_graph.py`), attention is cut out of the forward
        self.layer_break = layer_break
        self.retrieving = [i for i, s in enumerate(streams) if s.retrieve and s.work is not None
                           and s.work.retrieved.numel() > 0]
        self._token = None

    # --- the slice of transformers' Cache API the decoder layers use
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # [1, Hkv, T, D] -> [T, Hkv, D]
        backend.store_kv(self.pool, layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1), self.meta)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    def __enter__(self) -> "StepContext":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)


def retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, T, D] (packed sequences) -> ([1, T, Hq, D], None)."""
    ctx = _ACTIVE.get()
    if ctx is None:  # vision tower, or plain transformers use (e.g. model.generate): ordinary SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if ctx.layer_break is not None:  # a capture: the next piece reads what the break returns
        return ctx.layer_break(layer, q.contiguous(), scale)[None], None
    out = attend_layer(ctx, layer, q, scale)[None]
    if ctx.observer is not None:
        ctx.observer(module, query, key, value, out, ctx)
    return out, None


def attend_layer(ctx: StepContext, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """A layer's attention for the step, queries [T, Hq, D] -> [T, Hq, D]: first the retrieved
    slots of its questions in prefill, then one ragged attention over every sequence's slots."""
    if ctx.retrieving:
        retrieve_layer(ctx, layer, q, scale)
    return backend.attend(ctx.pool, layer, q.contiguous(), ctx.meta, scale)


AttentionInterface.register(ATTENTION_NAME, retrieval_attention)
