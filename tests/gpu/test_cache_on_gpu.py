"""GPU-only checks (skipped on CPU): the UVA gather path equals the host path bit for bit, and the
four retrievers give the same selection on CUDA as on the CPU."""

import pytest
import torch

from mosaic_ray.cache.gather import gather
from mosaic_ray.cache.host_pool import HostPool
from mosaic_ray.cache.stream_cache import StreamCache
from scaling_bench.harness.synthetic import centers_for, frame_batch
from mosaic_ray.config import CacheConfig, KVLayout, PoolConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("parts", ["kv", "v"])
def test_uva_gather_equals_host_gather(parts):
    layout = KVLayout(2, 4, 128, torch.bfloat16)
    pool = HostPool(layout, PoolConfig(capacity_bytes=64 << 20))
    assert pool.pinned
    cache = StreamCache(layout, CacheConfig(retrieval="token", window_tokens=8, sink_tokens=0, offload_batch=1), pool, "cuda")
    centers = centers_for(layout, "cuda")
    for f in range(6):
        cache.append(frame_batch(layout, f, 50, "cuda", centers))
    rows = torch.randint(0, pool.num_slabs * pool.slab_tokens, (4, 77))
    rows[:, ::7] = -1
    used = pool.owner.view(-1, 1).expand(-1, pool.slab_tokens).reshape(-1)[rows.clamp(min=0)] >= 0
    rows = torch.where(used, rows, -1)
    on_gpu = gather(pool, rows.cuda(), torch.device("cuda"), parts)
    on_host = gather(pool, rows, torch.device("cpu"), parts)
    for name, t in on_host.items():
        assert torch.equal(on_gpu[name].cpu(), t), name


@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
def test_retrieval_same_on_cuda_and_cpu(method):
    layout = KVLayout(2, 2, 64, torch.float32)
    out = {}
    for dev in ("cpu", "cuda"):
        pool = HostPool(layout, PoolConfig(capacity_bytes=64 << 20, pin_memory="auto"))
        cache = StreamCache(layout, CacheConfig(retrieval=method, offload_batch=1, window_tokens=16, sink_tokens=4, budget_tokens=40), pool, dev)
        centers = centers_for(layout, "cpu")
        for f in range(8):  # the same tokens on both devices: drawn on the CPU, then moved
            b = frame_batch(layout, f, 30, "cpu", centers)
            cache.append(type(b)(*(t.to(dev) if t is not None else None for t in (b.keys, b.values, b.order, b.time, b.pos, b.block))))
            cache.maintain()
        q = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).to(dev)
        r = cache.retrieve(1, q)
        out[dev] = (r.order.cpu(), r.keys.cpu())
    # float sums differ in the last bits between devices: the selections must agree almost fully
    same = (out["cpu"][0] == out["cuda"][0]).float().mean()
    assert same >= 0.95, float(same)
    torch.testing.assert_close(out["cpu"][1][out["cpu"][0] == out["cuda"][0]], out["cuda"][1][out["cpu"][0] == out["cuda"][0]])


def test_device_writes_land_bit_exact_and_in_order():
    """Rows written from the GPU (through UVA, no host sync) read back on the host bit for bit, and
    a slab freed after them reads as free (order -1) once they land."""
    layout = KVLayout(2, 4, 128, torch.bfloat16)
    host = HostPool(layout, PoolConfig(capacity_bytes=64 << 20))
    dev = HostPool(layout, PoolConfig(capacity_bytes=64 << 20))
    g = torch.Generator().manual_seed(0)
    n = 1000
    for p in (host, dev):
        p.allocate(n // p.slab_tokens + 2, owner=1)
    rows = torch.randperm(n, generator=g)
    k, v = torch.randn(n, 128, generator=g).bfloat16(), torch.randn(n, 128, generator=g).bfloat16()
    order, time = torch.arange(n), torch.rand(n, generator=g)
    pos = torch.randint(0, 99, (n, layout.pos_dims), generator=g).int()
    host.write(rows, k, v, order, time, pos)
    dev.write(rows.cuda(), k.cuda(), v.cuda(), order.cuda(), time.cuda(), pos.cuda())
    for a, b in zip(host.read(rows), dev.read(rows)):  # read() waits for the device writes
        assert torch.equal(a, b)
    first = rows[:1] // dev.slab_tokens
    dev.write(rows.cuda(), k.cuda(), v.cuda(), order.cuda(), time.cuda(), pos.cuda())
    dev.free(first)
    dev.sync()
    assert bool((dev.order[first] == -1).all())
