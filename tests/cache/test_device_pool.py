"""DeviceKVPool invariants: slots held once, all-or-nothing allocation, bit-exact write/read."""

import pytest
import torch

from mosaic_ray.cache.device_pool import DeviceKVPool, DevicePoolExhaustedError
from mosaic_ray.config import DevicePoolConfig, KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def test_allocation_is_all_or_nothing_and_slots_are_unique():
    pool = DeviceKVPool(LAYOUT, "cpu", DevicePoolConfig(capacity_tokens=10))
    a = pool.allocate(4)
    assert a.tolist() == [0, 1, 2, 3]  # a fresh pool hands out ascending runs
    with pytest.raises(DevicePoolExhaustedError):
        pool.allocate(7)
    assert pool.free_slots == 6  # the refused request took nothing
    b = pool.allocate(6)
    assert set(a.tolist()).isdisjoint(b.tolist()) and pool.free_slots == 0
    pool.free(a)
    c = pool.allocate(4)
    assert sorted(c.tolist()) == sorted(a.tolist())
    with pytest.raises(RuntimeError):
        pool.free(torch.arange(11))


def test_write_then_read_is_bit_exact_and_marks_valid():
    pool = DeviceKVPool(LAYOUT, "cpu", DevicePoolConfig(capacity_tokens=32))
    slots = pool.allocate(5)[torch.tensor([3, 0, 4, 1, 2])]
    k = torch.randn(LAYOUT.groups, 5, 8)
    v = torch.randn(LAYOUT.groups, 5, 8)
    pool.write(slots, k, v)
    k2, v2 = pool.read(slots)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert bool(pool.valid[:, slots].all()) and not bool(pool.valid[:, 5:].any())
    kl, vl = pool.read_layer(2, slots)
    assert torch.equal(kl, k[4:6]) and torch.equal(vl, v[4:6])


def test_growable_pool_keeps_contents():
    pool = DeviceKVPool(LAYOUT, "cpu", growable=True)
    first = pool.allocate(pool.num_slots)
    k = torch.randn(LAYOUT.groups, first.numel(), 8)
    pool.write(first, k, k)
    more = pool.allocate(5)
    assert pool.num_slots >= first.numel() + 5 and set(more.tolist()).isdisjoint(first.tolist())
    assert torch.equal(pool.read(first)[0], k)
    pool.free(first)
    pool.free(more)  # every slot can come back after a growth
    assert pool.free_slots == pool.num_slots


def test_cpu_default_capacity_follows_the_byte_budget():
    pool = DeviceKVPool(LAYOUT, "cpu", DevicePoolConfig(cpu_capacity_bytes=1 << 20))
    assert pool.num_slots == (1 << 20) // pool.slot_bytes
