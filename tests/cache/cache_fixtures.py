"""Synthetic clustered keys for the cache tests (a module with a unique name: importable from tests)."""

import torch

from mosaic_ray.cache.token_batch import TokenBatch
from mosaic_ray.config import KVLayout


def make_batch(layout: KVLayout, start: int, n: int, seed: int, centers: int = 6, spread: float = 0.3,
               tokens_per_block: int = 10) -> TokenBatch:
    """n tokens per group drawn around a few fixed centres (a stand-in for clustered keys)."""
    g = torch.Generator().manual_seed(seed)
    G, D = layout.groups, layout.head_dim
    mus = torch.randn(G, centers, D, generator=torch.Generator().manual_seed(1234)) * 2
    which = torch.randint(0, centers, (G, n), generator=g)
    keys = mus.gather(1, which[..., None].expand(G, n, D)) + spread * torch.randn(G, n, D, generator=g)
    values = torch.randn(G, n, D, generator=g)
    order = torch.arange(start, start + n)
    return TokenBatch(keys.to(layout.dtype), values.to(layout.dtype), order, order.float() * 0.1,
                      order[:, None].repeat(1, layout.pos_dims).int(), order // tokens_per_block)
