"""Small layouts and a stream of clustered synthetic keys shared by the cache tests."""

import pytest
import torch

from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.config import KVLayout, PoolConfig

LAYERS, HEADS, HEAD_DIM = 2, 2, 16


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout(LAYERS, HEADS, HEAD_DIM, torch.float32)


@pytest.fixture
def pool(layout) -> HostPool:
    return HostPool(layout, PoolConfig(capacity_bytes=32 << 20, slab_tokens=8))
