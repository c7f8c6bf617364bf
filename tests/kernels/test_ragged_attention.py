"""ragged_attention (kernel and torch reference) against a plain per-sequence attention: ragged
batches with odd lengths, grouped heads, invalid entries, prefill tiles and split-KV decode."""

import math

import pytest
import torch

from mosaic_ray.kernels.ragged_attention import choose_splits, ragged_attention, ragged_attention_reference

# dtype -> (atol, rtol) of the kernel against the float64 per-sequence definition
TOLERANCE = {torch.float32: (2e-5, 2e-5),  # the kernel computes fp32 inputs in IEEE fp32, not TF32
             torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# (q_lens, kv_lens before the new tokens, Hq, Hkv, D)
SHAPES = [
    ([1], [0], 2, 2, 16),
    ([1, 1, 1], [5, 70, 33], 4, 2, 16),
    ([3, 1, 17], [0, 129, 40], 6, 2, 32),
    ([7, 2], [61, 3], 7, 1, 16),
    ([40], [90], 9, 3, 64),
]


def _plain(q, k_pool, v_pool, valid, kv_indices, cu_q, cu_kv, scale):
    """One sequence at a time, one query at a time, float64: the definition."""
    T, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    rep = Hq // Hkv
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_kv[s]), int(cu_kv[s + 1])
        n, L = q1 - q0, k1 - k0
        slots = kv_indices[k0:k1].cpu()
        for i in range(n):
            for h in range(Hq):
                g = h // rep
                keep = [j for j in range(L) if j <= L - n + i and bool(valid[slots[j], g])]
                K = k_pool[slots[keep], g].double().cpu()
                V = v_pool[slots[keep], g].double().cpu()
                w = torch.softmax(K @ q[q0 + i, h].double().cpu() * scale, 0)
                out[q0 + i, h] = w @ V
    return out


def _batch(q_lens, ctx_lens, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(q_lens)
    kv_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    N = sum(kv_lens) + 13  # spare slots nobody reads
    k_pool = torch.randn(N, Hkv, D, generator=g).to(dtype)
    v_pool = torch.randn(N, Hkv, D, generator=g).to(dtype)
    valid = torch.rand(N, Hkv, generator=g) > 0.2
    perm = torch.randperm(N, generator=g)[: sum(kv_lens)]  # scattered slots, as in the pool
    kv_indices = perm.clone()
    # each sequence's new tokens (its last n slots) are valid: they were just stored
    ends = torch.tensor(kv_lens).cumsum(0)
    for e, n in zip(ends.tolist(), q_lens):
        valid[kv_indices[e - n : e]] = True
    cu_q = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cu_kv = torch.tensor([0] + kv_lens).cumsum(0).to(torch.int32)
    q = torch.randn(T, Hq, D, generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return [to(t) for t in (q, k_pool, v_pool, valid, kv_indices, cu_q, cu_kv)], max(q_lens), max(kv_lens)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_the_definition(shape):
    args, _, _ = _batch(*shape, torch.float32, "cpu")
    scale = 1 / math.sqrt(shape[-1])
    got = ragged_attention_reference(*args, scale)
    torch.testing.assert_close(got.double(), _plain(*args, scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_kernel_equals_the_definition(device, shape, dtype, splits):
    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter computes in numpy: half types only on a GPU")
    args, max_q, max_kv = _batch(*shape, dtype, device)
    scale = 1 / math.sqrt(shape[-1])
    got = ragged_attention(*args, scale, max_q, max_kv, splits=splits, backend="triton")
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), _plain(*args, scale), atol=atol, rtol=rtol)


def test_split_choice_fills_the_gpu_when_programs_are_few():
    assert choose_splits(1 * 4, 30_000, 132) == 58  # one decode: 4 programs -> 58 splits of ~517
    assert choose_splits(64 * 4, 8_000, 132) == 2
    assert choose_splits(16 * 4 * 17, 2_200, 132) == 1  # ingest tiles are work enough
    assert choose_splits(1 * 4 * 3, 524_288, 132) == 22  # a short question over a long past
    assert choose_splits(4, 300, 132) == 1  # too short to split


def test_shapes_are_checked(device):
    args, max_q, max_kv = _batch([2], [3], 4, 2, 16, torch.float32, device)
    q, k, v, valid, idx, cu_q, cu_kv = args
    with pytest.raises(ValueError, match="valid"):
        ragged_attention(q, k, v, valid.int(), idx, cu_q, cu_kv, 0.25, max_q, max_kv)
    with pytest.raises(ValueError, match="does not fit"):
        ragged_attention(q[:, :3], k, v, valid, idx, cu_q, cu_kv, 0.25, max_q, max_kv)
