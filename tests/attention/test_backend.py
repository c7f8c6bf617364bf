"""The attention backend over the device pool: store by slot + one ragged call equals plain
attention over each sequence's [context | new] keys, for a mixed batch (ingest chunk, question
prefill over retrieved slots with invalid entries, decode)."""

import pytest
import torch

from mosaic_ray.attention.backend import attend, build_metadata, store_kv
from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.config import DevicePoolConfig, KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
HQ = 6


def _sdpa(q, k, v, visible, scale):
    """q [n, Hq, D] against k/v [L, Hkv, D]; visible [n, Hkv, L] bool."""
    rep = HQ // LAYOUT.num_kv_heads
    kk = k.repeat_interleave(rep, 1).permute(1, 0, 2)
    vv = v.repeat_interleave(rep, 1).permute(1, 0, 2)
    m = visible.repeat_interleave(rep, 1).permute(1, 0, 2)
    s = (q.permute(1, 0, 2) @ kk.transpose(1, 2)) * scale
    w = torch.softmax(s.masked_fill(~m, float("-inf")), -1)
    return (w @ vv).permute(1, 0, 2)


def test_mixed_batch_equals_plain_attention():
    g = torch.Generator().manual_seed(0)
    pool = DeviceKVPool(LAYOUT, "cpu", DevicePoolConfig(capacity_tokens=200))
    layer, D, H = 1, 16, 2
    # three sequences: 9 context + 5 new (ingest), 7 context + 6 retrieved (2 invalid) + 4 new,
    # 12 context + 1 new (decode)
    ctx_a, ctx_b, ret_b, ctx_c = (pool.allocate(n) for n in (9, 7, 6, 12))
    for s in (ctx_a, ctx_b, ret_b, ctx_c):
        pool.write(s, torch.randn(LAYOUT.groups, s.numel(), D, generator=g), torch.randn(LAYOUT.groups, s.numel(), D, generator=g))
    pool.valid[layer, ret_b[[1, 4]], 0] = False
    pool.valid[layer, ret_b[2], 1] = False
    new = [pool.allocate(n) for n in (5, 4, 1)]
    ctxs = [ctx_a, torch.cat([ctx_b, ret_b]), ctx_c]
    meta = build_metadata(ctxs, new, torch.device("cpu"))
    T = 10
    q = torch.randn(T, HQ, D, generator=g)
    k_new = torch.randn(T, H, D, generator=g)
    v_new = torch.randn(T, H, D, generator=g)
    store_kv(pool, layer, k_new, v_new, meta)
    got = attend(pool, layer, q, meta, 0.25)
    for (lo, hi), ctx, nw in zip(meta.q_bounds, ctxs, new):
        slots = torch.cat([ctx, nw])
        k, v = pool.k[layer, slots], pool.v[layer, slots]
        assert torch.equal(pool.k[layer, nw], k_new[lo:hi])  # stored by slot
        n, L = hi - lo, slots.numel()
        causal = torch.arange(L)[None] <= (L - n + torch.arange(n))[:, None]
        visible = causal[:, None, :] & pool.valid[layer, slots].T[None]
        torch.testing.assert_close(got[lo:hi], _sdpa(q[lo:hi], k, v, visible, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_step_on_flash_equals_the_ragged_kernel(dtype):
    """A dense step (every slot valid: a frame ingest) goes through FlashAttention varlen with
    grouped heads; it must equal the ragged kernel's output (same causal alignment at the end of
    each sequence), for sequences of unequal lengths and slots scattered over the pool."""
    dev = torch.device("cuda")
    layout = KVLayout(num_layers=2, num_kv_heads=4, head_dim=128, dtype=dtype)
    hq, layer = 28, 1
    pool = DeviceKVPool(layout, dev, DevicePoolConfig(capacity_tokens=8192))
    g = torch.Generator(device=dev).manual_seed(0)
    ctx = [pool.allocate(n) for n in (700, 1, 2100)]
    for s in ctx:
        pool.write(s, torch.randn(layout.groups, s.numel(), 128, device=dev, generator=g).to(dtype),
                   torch.randn(layout.groups, s.numel(), 128, device=dev, generator=g).to(dtype))
    new = [pool.allocate(n) for n in (146, 37, 292)]
    T = sum(n.numel() for n in new)
    q = torch.randn(T, hq, 128, device=dev, generator=g).to(dtype)
    kn, vn = (torch.randn(T, 4, 128, device=dev, generator=g).to(dtype) for _ in range(2))
    dense = build_metadata(ctx, new, dev, dense=True)
    store_kv(pool, layer, kn, vn, dense)
    got = attend(pool, layer, q, dense, 128 ** -0.5)
    want = attend(pool, layer, q, build_metadata(ctx, new, dev), 128 ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
