"""The anchor: the same model run by plain transformers, its whole stream in a `DynamicCache`.

Same calls a transformers user makes (decoder forward with `past_key_values`, SDPA attention, greedy
next token), over a cache of the given length filled with random K/V (speed depends on shapes, not
weights). Our engine's `full` should never be slower than this; everything else should beat it.

    question(adapter, past_tokens, prompt_ids, max_tokens)  -> TTFT and decode tokens/s, one stream
    decode_step(adapter, batch, kv_tokens, steps)           -> ms per decode step of `batch` streams
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from mosaic_ray.model.attention import ATTENTION_NAME
from scaling_bench.harness.timing import sync

# torch's SDPA backends without cuDNN: on the H200 (torch 2.11) cuDNN's attention builds an
# execution plan for every new key length, 1.75 ms of host time per call, i.e. ~49 ms per decode
# step of a 28-layer model whose KV grows by one token a step (torch.profiler, docs/benchmarks.md)
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def plain_attention(adapter, cudnn: bool = True):
    """transformers' own SDPA attention (and its own masks) for the decoder while inside; with
    cudnn=False torch may not pick cuDNN's kernel (the tuned anchor)."""
    model = adapter.model
    composite = hasattr(model.config, "text_config")
    model.set_attn_implementation({"text_config": "sdpa"} if composite else "sdpa")
    try:
        with contextlib.nullcontext() if cudnn else sdpa_kernel(NO_CUDNN):
            yield
    finally:
        model.set_attn_implementation({"text_config": ATTENTION_NAME} if composite else ATTENTION_NAME)


def _cache(adapter, batch: int, tokens: int, seed: int = 0) -> DynamicCache:
    lay, dev = adapter.layout, adapter.device
    g = torch.Generator(device=dev).manual_seed(seed)
    layers = []
    for _ in range(lay.num_layers):
        shape = (batch, lay.num_kv_heads, tokens, lay.head_dim)
        layers.append((torch.randn(shape, device=dev, generator=g, dtype=lay.dtype),
                       torch.randn(shape, device=dev, generator=g, dtype=lay.dtype)))
    return DynamicCache(layers)


def _positions(adapter, start: int, batch: int, n: int) -> torch.Tensor:
    pos = torch.arange(start, start + n, device=adapter.device)[None].expand(batch, n)
    return pos[None].expand(3, batch, n) if adapter.layout.pos_dims == 3 else pos


@torch.no_grad()
def _forward(adapter, ids: torch.Tensor, past: int, cache: DynamicCache) -> torch.Tensor:
    embeds = adapter.embedding()(ids)
    b, n = ids.shape
    out = adapter.decoder()(inputs_embeds=embeds, position_ids=_positions(adapter, past, b, n),
                            past_key_values=cache, use_cache=True)
    return adapter.lm_head()(out.last_hidden_state[:, -1]).argmax(-1)


def question(adapter, past_tokens: int, prompt_ids: list[int], max_tokens: int, cudnn: bool = True) -> dict:
    """One question over `past_tokens` of stream in a DynamicCache: TTFT (prefill of the prompt,
    first token chosen) and decode tokens/s (greedy, `max_tokens` tokens, no stop)."""
    with plain_attention(adapter, cudnn):
        return _question(adapter, past_tokens, prompt_ids, max_tokens)


def _question(adapter, past_tokens: int, prompt_ids: list[int], max_tokens: int) -> dict:
    dev = adapter.device
    cache = _cache(adapter, 1, past_tokens)
    ids = torch.tensor([prompt_ids], device=dev)
    sync(dev)
    t0 = time.perf_counter()
    tok = _forward(adapter, ids, past_tokens, cache)
    tok.item()
    t1 = time.perf_counter()
    pos = past_tokens + len(prompt_ids)
    for i in range(max_tokens - 1):
        tok = _forward(adapter, tok[:, None], pos + i, cache)
        tok.item()  # the token goes back to the host every step, as a server streams it
    t2 = time.perf_counter()
    del cache
    return {"ttft_ms": (t1 - t0) * 1e3, "decode_tok_s": (max_tokens - 1) / max(1e-9, t2 - t1)}


def decode_step(adapter, batch: int, kv_tokens: int, steps: int = 8, cudnn: bool = True) -> float:
    """ms per decode step of `batch` streams each over `kv_tokens` of cache (eager, one token each)."""
    with plain_attention(adapter, cudnn):
        return _decode_step(adapter, batch, kv_tokens, steps)


def _decode_step(adapter, batch: int, kv_tokens: int, steps: int) -> float:
    dev = adapter.device
    cache = _cache(adapter, batch, kv_tokens)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    for i in range(2):  # warm-up
        tok = _forward(adapter, tok, kv_tokens + i, cache)[:, None]
    sync(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        tok = _forward(adapter, tok, kv_tokens + 2 + i, cache)[:, None]
        tok.cpu()
    ms = (time.perf_counter() - t0) / steps * 1e3
    del cache
    return ms
