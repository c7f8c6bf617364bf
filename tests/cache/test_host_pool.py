import pytest
import torch

from mosaic_ray.cache.host_pool import HostPool, PoolExhaustedError
from mosaic_ray.config import KVLayout, PoolConfig


def test_write_read_bit_exact(layout, pool):
    owner = pool.register_owner()
    slabs = pool.allocate(3, owner)
    rows = torch.cat([s * pool.slab_tokens + torch.arange(pool.slab_tokens) for s in slabs])
    n, D = rows.numel(), layout.head_dim
    k, v = torch.randn(n, D), torch.randn(n, D)
    order, time, pos = torch.arange(n), torch.rand(n), torch.randint(0, 99, (n, 1), dtype=torch.int32)
    pool.write(rows, k, v, order, time, pos)
    rk, rv, ro, rt, rp = pool.read(rows)
    assert torch.equal(rk, k) and torch.equal(rv, v) and torch.equal(ro, order)
    assert torch.equal(rt, time) and torch.equal(rp, pos)


def test_allocation_is_all_or_nothing(pool):
    owner = pool.register_owner()
    free = pool.free_slabs
    with pytest.raises(PoolExhaustedError, match="need"):
        pool.allocate(free + 1, owner)
    assert pool.free_slabs == free and pool.owned_slabs(owner) == 0


def test_release_owner_frees_everything(pool):
    a, b = pool.register_owner(), pool.register_owner()
    pool.allocate(5, a)
    pool.allocate(2, b)
    assert pool.release_owner(a) == 5
    assert pool.owned_slabs(b) == 2 and pool.free_slabs == pool.num_slabs - 2


def test_double_free_raises(pool):
    ids = pool.allocate(2, pool.register_owner())
    pool.free(ids)
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(ids)


def test_refuses_more_than_free_ram(layout):
    with pytest.raises(ValueError, match="GiB of RAM is free"):
        HostPool(layout, PoolConfig(capacity_bytes=1 << 50))


def test_sized_from_ram_fraction(layout):
    pool = HostPool(layout, PoolConfig(ram_fraction=0.001))
    assert pool.num_slabs > 0 and not pool.pinned  # no CUDA here


@pytest.mark.parametrize("name,shape", [("k", (3, 15)), ("pos", (3, 2))])
def test_write_shape_errors_name_expected_and_got(layout, pool, name, shape):
    slabs = pool.allocate(1, pool.register_owner())
    rows = slabs[0] * pool.slab_tokens + torch.arange(3)
    args = dict(k=torch.zeros(3, 16), v=torch.zeros(3, 16), order=torch.arange(3), time=torch.zeros(3),
                pos=torch.zeros(3, 1, dtype=torch.int32))
    args[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"expected .* got"):
        pool.write(rows, **args)


def test_bfloat16_layout_roundtrip():
    layout = KVLayout(1, 1, 8, "bfloat16")
    pool = HostPool(layout, PoolConfig(capacity_bytes=1 << 20, slab_tokens=4))
    slabs = pool.allocate(1, pool.register_owner())
    rows = slabs[0] * 4 + torch.arange(4)
    k = torch.randn(4, 8).bfloat16()
    pool.write(rows, k, k, torch.arange(4), torch.zeros(4), torch.zeros(4, 1, dtype=torch.int32))
    assert torch.equal(pool.read(rows)[0], k)
