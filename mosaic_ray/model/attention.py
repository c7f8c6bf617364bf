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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.cache.token_batch import Retrieved

ATTENTION_NAME = "mosaic_retrieval"
# Benchmarks set this to time each layer's fetch exactly (a device sync per layer; off in serving).
TIME_FETCH = False
_ACTIVE: contextvars.ContextVar["StepContext | None"] = contextvars.ContextVar("mosaic_step", default=None)


@dataclass(slots=True)
class StreamStep:
    """One stream's part of a batched forward step.

    new_tokens: valid (unpadded) new tokens of this stream in the step.
    retrieve: fetch the past for each layer during this step (question prefill); the result is
        kept in `retrieved` and reused by later decode steps of the same question.
    pending_k/v: per layer [H, m, D] tokens of the current question/answer not yet in the cache.
    """

    cache: StreamCache
    new_tokens: int
    retrieve: bool = False
    since: float | None = None
    until: float | None = None
    retrieved: dict[int, Retrieved] = field(default_factory=dict)
    pending_k: dict[int, torch.Tensor] = field(default_factory=dict)
    pending_v: dict[int, torch.Tensor] = field(default_factory=dict)
    use_past: bool = False
    # what this stream's retrieval moved on the critical path ({"copies", "bytes", "tokens",
    # "seconds"}, summed over layers) and how many selected rows a prefetch had already brought
    fetched: dict[str, float] = field(default_factory=lambda: {"copies": 0, "bytes": 0, "tokens": 0, "seconds": 0.0,
                                                               "rows": 0, "prefetch_hits": 0})
    # layer -> rows gathered ahead by the Prefetcher, consumed by that layer's retrieval
    prefetched: dict = field(default_factory=dict)


class StepContext:
    """Passed to the decoder as `past_key_values`; collects new K/V and serves attention."""

    def __init__(self, streams: list[StreamStep], prefetch: bool = False) -> None:
        self.streams = streams
        self.prefetch = prefetch
        self.new_k: dict[int, torch.Tensor] = {}
        self.new_v: dict[int, torch.Tensor] = {}
        self.fetch_stats = {"copies": 0, "bytes": 0, "tokens": 0, "seconds": 0.0}
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
            for stats in (self.fetch_stats, step.fetched):
                stats["copies"] += r.copies
                stats["bytes"] += r.bytes_moved
                stats["tokens"] += r.tokens
        return step.retrieved.get(layer) if step.use_past else None

    def keys_for(self, i: int, layer: int, query_mean: torch.Tensor, new_k, new_v):
        """(K [H, L, D], V [H, L, D], visible [L] bool, num_before_new) for stream i of the batch."""
        step = self.streams[i]
        k_res, v_res, _ = step.cache.resident(layer)
        ks, vs = [k_res], [v_res]
        vis = [torch.ones(k_res.shape[1], dtype=torch.bool, device=k_res.device)]
        past = self._past(step, layer, query_mean)
        if past is not None:
            ks.append(past.keys.to(k_res.dtype))
            vs.append(past.values.to(v_res.dtype))
            vis.append(past.valid)
        if layer in step.pending_k:
            ks.append(step.pending_k[layer])
            vs.append(step.pending_v[layer])
            vis.append(torch.ones(step.pending_k[layer].shape[1], dtype=torch.bool, device=k_res.device))
        n = step.new_tokens
        ks.append(new_k[:, :n])
        vs.append(new_v[:, :n])
        vis.append(torch.ones(n, dtype=torch.bool, device=k_res.device))
        return ks, vs, vis


def _cat_visible(vis: list[torch.Tensor], H: int) -> torch.Tensor:
    """Concatenate visibility parts into [H, L] (parts are [L_i] shared or [H, L_i] per head)."""
    return torch.cat([v if v.dim() == 2 else v[None].expand(H, -1) for v in vis], 1)


def retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over each stream's assembled keys. query [b, Hq, n, D]; key/value [b, Hkv, n, D]."""
    ctx = _ACTIVE.get()
    if ctx is None:  # vision tower, or plain transformers use (e.g. model.generate): ordinary SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    b, Hq, n, D = query.shape
    Hkv = key.shape[1]
    rep = Hq // Hkv
    # the question's mean query per KV head: mean over its tokens and the query heads of the group
    outs = []
    for i, step in enumerate(ctx.streams):
        q_i = query[i, :, : step.new_tokens]
        q_mean = q_i.float().reshape(Hkv, rep, -1, D).mean((1, 2))
        ks, vs, vis = ctx.keys_for(i, layer, q_mean, key[i], value[i])
        K, V = torch.cat(ks, 1), torch.cat(vs, 1)
        visible = _cat_visible(vis, Hkv)  # [Hkv, L]
        L, before = K.shape[1], K.shape[1] - step.new_tokens
        causal = torch.ones(n, L, dtype=torch.bool, device=query.device)
        causal[:, before:] = torch.tril(torch.ones(n, step.new_tokens, dtype=torch.bool, device=query.device))
        mask = causal[None] & visible[:, None, :]  # [Hkv, n, L]
        mask[:, :, 0] |= ~mask.any(-1)  # padded query rows: attend somewhere, output ignored
        mask = mask.repeat_interleave(rep, 0)
        Kx, Vx = K.repeat_interleave(rep, 0), V.repeat_interleave(rep, 0)
        out = F.scaled_dot_product_attention(
            query[i : i + 1], Kx[None].to(query.dtype), Vx[None].to(query.dtype), attn_mask=mask[None], scale=scaling
        )
        outs.append(out)
    out = torch.cat(outs, 0)  # [b, Hq, n, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, retrieval_attention)
