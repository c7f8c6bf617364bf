"""Synthetic KV for speed benchmarks: speed depends on shapes, not weights.

Keys are drawn around a few centres per (layer, head) that drift slowly over frames, like the
tokens of consecutive, similar frames; retrieval *quality* is measured on real features instead
(scaling_bench/fidelity.py, scaling_bench/needle.py).
"""

from __future__ import annotations

import torch

from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import KVLayout


def frame_batch(layout: KVLayout, frame: int, tokens: int, device, centers: torch.Tensor, pos_start: int | None = None) -> TokenBatch:
    """One frame's tokens: each token near one of a few centres that drift slowly over frames."""
    G, D = layout.groups, layout.head_dim
    g = torch.Generator(device=device).manual_seed(frame)
    drift = 0.02 * frame
    which = torch.randint(0, centers.shape[1], (G, tokens), device=device, generator=g)
    mu = centers.gather(1, which[..., None].expand(G, tokens, D)) + drift
    keys = (mu + 0.35 * torch.randn(G, tokens, D, device=device, generator=g)).to(layout.dtype)
    values = torch.randn(G, tokens, D, device=device, generator=g).to(layout.dtype)
    order = torch.arange(frame * tokens, (frame + 1) * tokens, device=device)
    pos = order if pos_start is None else torch.arange(pos_start, pos_start + tokens, device=device)
    return TokenBatch(keys, values, order, torch.full((tokens,), float(frame), device=device),
                      pos[:, None].repeat(1, layout.pos_dims).int(), torch.full((tokens,), frame, device=device))


def centers_for(layout: KVLayout, device, count: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(layout.groups, count, layout.head_dim, device=device, generator=g) * 2


def fill(engine, sid: str, frames: int, tokens: int, centers) -> None:
    """Append `frames` synthetic frames of `tokens` tokens straight into the stream's cache."""
    state = engine.streams[sid]
    for f in range(frames):
        batch = frame_batch(engine.layout, f, tokens, engine.device, centers, pos_start=state.next_pos)
        batch.order += state.tokens - f * tokens
        state.cache.append(batch)
        state.cache.maintain(engine.config.splits_per_step)
        state.tokens += tokens
        state.next_pos += tokens
        state.frames += 1
        state.clock = float(f)
