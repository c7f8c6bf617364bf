"""Retrieval attention: the hook that lets transformers' own decoder layers attend over a stream's
[sink + retrieved past + local window + pending + new] tokens.

transformers 5.x decoder attention projects q/k/v, applies RoPE, calls
`past_key_values.update(k, v, layer_idx)`, then the function registered under our attention
implementation name. We pass a `StepContext` as `past_key_values`: `update` records the step's new
K/V (after RoPE) per layer, and `retrieval_attention` assembles each stream's keys, fetching the
past for that layer first when the step is a question prefill. No model code is re-implemented.

Layout of one stream's keys in a step, all after RoPE and so order-free for attention:
    resident (sink + window, from StreamCache) | retrieved past (question/decode) | pending | new
`new` tokens are causal among themselves; everything before them is visible when valid.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.token_batch import Retrieved

ATTENTION_NAME = "mosaic_retrieval"
QUESTION_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Benchmarks set this to time each layer's fetch exactly (a device sync per layer; off in serving).
TIME_FETCH = False
_ACTIVE: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("mosaic_step", default=None)


@dataclass(slots=True)
class StreamStep:
    """One stream's part of a batched forward step.

    new_tokens: valid (unpadded) new tokens of this stream in the step.
    retrieve: fetch the past for each layer during this step (question prefill); the result is
        kept in `retrieved` and reused by later decode steps of the same question.
    buffers: per layer the question's keys (QuestionKV): what it attends and its own new tokens,
        appended to the cache when the answer commits.
    """

    cache: StreamCache
    new_tokens: int
    retrieve: bool = False
    since: float | None = None
    until: float | None = None
    retrieved: dict[int, Retrieved] = field(default_factory=dict)
    use_past: bool = False
    # what this stream's retrieval moved on the critical path ({"copies", "bytes", "tokens",
    # "seconds"}, summed over layers) and how many selected rows a prefetch had already brought
    fetched: dict[str, float] = field(default_factory=lambda: {"copies": 0, "bytes": 0, "tokens": 0, "seconds": 0.0,
                                                               "rows": 0, "prefetch_hits": 0})
    # layer -> rows gathered ahead by the Prefetcher, consumed by that layer's retrieval
    prefetched: dict = field(default_factory=dict)
    # question steps: layer -> QuestionKV, and how many tokens the question may still add
    buffers: dict = field(default_factory=dict)
    reserve: int = 0


class StepContext:
    """Passed to the decoder as `past_key_values`; collects new K/V and serves attention."""

    def __init__(self, streams: list[StreamStep], prefetch: bool = False) -> None:
        self.streams = streams
        self.prefetch = prefetch
        self.new_k: dict[int, torch.Tensor] = {}
        self.new_v: dict[int, torch.Tensor] = {}
        self._token = None

    # --- the slice of transformers' Cache API the decoder layers use
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_k[layer_idx], self.new_v[layer_idx] = key_states, value_states
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

    # --- assembling keys
    def _past(self, step: StreamStep, layer: int, query: torch.Tensor) -> Retrieved | None:
        if step.retrieve and layer not in step.retrieved and step.cache.past_tokens > 0:
            t0 = time.perf_counter()
            with torch.no_grad():
                pre = step.prefetched.pop(layer, None)
                if pre is None:
                    step.retrieved[layer] = step.cache.retrieve(layer, query, step.since, step.until)
                else:
                    sel = step.cache.select(layer, query, step.since, step.until)
                    step.retrieved[layer] = step.cache.retriever.fetch(sel, step.since, step.until, prefetched=pre)
                    rows = int((sel.rows >= 0).sum())
                    step.fetched["rows"] += rows
                    step.fetched["prefetch_hits"] += rows - step.retrieved[layer].misses
            if TIME_FETCH and query.is_cuda:
                torch.cuda.synchronize()
            step.fetched["seconds"] += time.perf_counter() - t0
            r = step.retrieved[layer]
            step.fetched["copies"] += r.copies
            step.fetched["bytes"] += r.bytes_moved
            step.fetched["tokens"] += r.tokens
        return step.retrieved.get(layer) if step.use_past else None

    def keys_for(self, i: int, layer: int, query_mean: torch.Tensor, new_k, new_v):
        """(K [H, L, D], V [H, L, D], visible [H, L] bool or None = all) for stream i of the batch;
        the step's new tokens are the last `new_tokens` entries."""
        step = self.streams[i]
        n = step.new_tokens
        k_res, v_res, _ = step.cache.resident(layer)
        if not step.use_past:  # ingest: sink + window + chunk
            return torch.cat([k_res, new_k[:, :n]], 1), torch.cat([v_res, new_v[:, :n]], 1), None
        buf = step.buffers.get(layer)
        if buf is None:  # first step of a question: [resident | retrieved] once, then room to grow
            past = self._past(step, layer, query_mean)
            parts_k, parts_v = [k_res], [v_res]
            vis = [torch.ones(k_res.shape[0], k_res.shape[1], dtype=torch.bool, device=k_res.device)]
            if past is not None:
                parts_k.append(past.keys.to(k_res.dtype))
                parts_v.append(past.values.to(v_res.dtype))
                vis.append(past.valid)
            base_k, base_v, base_vis = torch.cat(parts_k, 1), torch.cat(parts_v, 1), torch.cat(vis, 1)
            H, L0, D = base_k.shape
            cap = L0 + step.reserve
            buf = QuestionKV(base_k.new_empty(H, cap, D), base_v.new_empty(H, cap, D),
                             torch.ones(H, cap, dtype=torch.bool, device=base_k.device), L0, L0)
            buf.k[:, :L0], buf.v[:, :L0], buf.visible[:, :L0] = base_k, base_v, base_vis
            buf.all_visible = bool(base_vis.all())
            step.buffers[layer] = buf
        end = buf.used + n
        if end > buf.k.shape[1]:
            raise RuntimeError(f"question buffer overflow: {end} > {buf.k.shape[1]} (reserve too small)")
        buf.k[:, buf.used : end] = new_k[:, :n]
        buf.v[:, buf.used : end] = new_v[:, :n]
        buf.used = end
        return buf.k[:, :end], buf.v[:, :end], None if buf.all_visible else buf.visible[:, :end]


@dataclass(slots=True)
class QuestionKV:
    """One layer's keys for a whole question: [resident | retrieved] fixed at prefill, then the
    question's and answer's own tokens appended in place (no re-concatenation per decode step)."""

    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor
    used: int
    base: int  # entries before the question's own tokens
    all_visible: bool = True

    def own(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [H, m, D] of the question's and answer's tokens fed so far."""
        return self.k[:, self.base : self.used], self.v[:, self.base : self.used]


def retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over each stream's assembled keys. query [b, Hq, n, D]; key/value [b, Hkv, n, D].

    Grouped-query attention without copies: the query heads of one KV head are viewed as that
    KV head's batch entry (`[Hkv, rep, n, D]` against `[Hkv, 1, L, D]`).
    """
    ctx = _ACTIVE.get()
    if ctx is None:  # vision tower, or plain transformers use (e.g. model.generate): ordinary SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    # Question steps (retrieved past) skip cuDNN's SDPA: it builds an execution plan per new shape
    # and a question's key count is new every time (H100: one question 1.34 s -> 0.98 s without it);
    # ingest steps keep it (their shapes repeat; there it was 1.7x faster at 32 frames a batch).
    question = query.is_cuda and any(step.use_past for step in ctx.streams)
    with sdpa_kernel(QUESTION_SDPA_BACKENDS) if question else nullcontext():
        return _attend_streams(ctx, module, query, key, value, scaling)


def _attend_streams(ctx, module, query, key, value, scaling):
    layer = module.layer_idx
    b, Hq, n, D = query.shape
    Hkv = key.shape[1]
    rep = Hq // Hkv
    outs = []
    for i, step in enumerate(ctx.streams):
        q_i = query[i].view(Hkv, rep, n, D)
        # the question's mean query per KV head: mean over its tokens and the group's query heads
        q_mean = q_i[:, :, : step.new_tokens].float().mean((1, 2))
        K, V, visible = ctx.keys_for(i, layer, q_mean, key[i], value[i])
        L, new = K.shape[1], step.new_tokens
        mask = None
        if new > 1 or n > new or visible is not None:
            causal = torch.ones(n, L, dtype=torch.bool, device=query.device)
            causal[:, L - new :] = torch.tril(torch.ones(n, new, dtype=torch.bool, device=query.device))
            causal[new:, 0] = True  # padded query rows attend somewhere; their output is ignored
            mask = causal[None] if visible is None else causal[None] & visible[:, None, :]
            mask = mask[:, None]  # [Hkv or 1, 1, n, L]
        out = F.scaled_dot_product_attention(
            q_i, K[:, None].to(query.dtype), V[:, None].to(query.dtype), attn_mask=mask, scale=scaling, enable_gqa=True
        )
        outs.append(out.reshape(1, Hq, n, D))
    out = torch.cat(outs, 0)  # [b, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, retrieval_attention)
