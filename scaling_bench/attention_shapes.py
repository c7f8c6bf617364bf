"""Attention at ingest and question-prefill shapes on a GPU: the ragged Triton kernel (its tiles) against
K/V gathered by slot + FlashAttention varlen (aten). Writes attention_shapes.json under $OUT (default /tmp).

    python scaling_bench/attention_shapes.py          # CUDA only
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: scaling_bench, mosaic_ray

from mosaic_ray.kernels.ragged_attention import (  # noqa: E402
    ragged_attention,
    ragged_attention_reference,
)
from scaling_bench.harness.timing import median_s  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
Hq, Hkv, D = 28, 4, 128
N = 400_000
kp = torch.randn(N, Hkv, D, device=dev, dtype=torch.bfloat16)
vp = torch.randn(N, Hkv, D, device=dev, dtype=torch.bfloat16)
valid = torch.ones(N, Hkv, dtype=torch.bool, device=dev)
out_rows = []


def case(S, nq, past):
    perm = torch.randperm(N, device=dev)
    lists, cu_q, cu_kv = [], [0], [0]
    off = 0
    for s in range(S):
        L = past + nq
        lists.append(perm[off:off + L])
        off += L
        cu_q.append(cu_q[-1] + nq)
        cu_kv.append(cu_kv[-1] + L)
    idx = torch.cat(lists)
    cq = torch.tensor(cu_q, dtype=torch.int32, device=dev)
    ck = torch.tensor(cu_kv, dtype=torch.int32, device=dev)
    q = torch.randn(S * nq, Hq, D, device=dev, dtype=torch.bfloat16)
    return q, idx, cq, ck, nq, past + nq


def flash(q, idx, cq, ck, mq, mk, scale):
    k = kp.index_select(0, idx)
    v = vp.index_select(0, idx)
    out = torch.ops.aten._flash_attention_forward(q, k, v, cq, ck, mq, mk, 0.0, True, False, scale=scale)
    return out[0]


def flash_only(k, v):
    def f(q, idx, cq, ck, mq, mk, scale):
        return torch.ops.aten._flash_attention_forward(q, k, v, cq, ck, mq, mk, 0.0, True, False, scale=scale)[0]
    return f


def varlen_rep(q, idx, cq, ck, mq, mk, scale):
    from torch.nn.attention.varlen import varlen_attn
    k = kp.index_select(0, idx).repeat_interleave(Hq // Hkv, 1)
    v = vp.index_select(0, idx).repeat_interleave(Hq // Hkv, 1)
    return varlen_attn(q, k, v, cq, ck, mq, mk, scale=scale, window_size=(-1, 0))


for label, (S, nq, past) in {"ingest 22x146 over 2.2k": (22, 146, 2052), "ingest 8x146 over 2.2k": (8, 146, 2052),
                             "ingest 32x146 over 2.2k": (32, 146, 2052), "qprefill 6x20 over 3k": (6, 20, 3000)}.items():
    q, idx, cq, ck, mq, mk = case(S, nq, past)
    scale = D ** -0.5
    ref = None
    if S * nq * mk < 2_000_000_0:
        ref = ragged_attention_reference(q.float(), kp.float(), vp.float(), valid, idx, cq, ck, scale).to(torch.bfloat16)
    flops = 4 * S * nq * (mk - nq / 2) * Hq * D
    variants = {"ragged default": lambda: ragged_attention(q, kp, vp, valid, idx, cq, ck, scale, mq, mk)}
    for tile in [(64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2)]:
        variants[f"ragged tile {tile}"] = (lambda t=tile: ragged_attention(q, kp, vp, valid, idx, cq, ck, scale, mq, mk, tile=t))
    variants["gather+flash(aten, gqa)"] = lambda: flash(q, idx, cq, ck, mq, mk, scale)
    kg, vg = kp.index_select(0, idx), vp.index_select(0, idx)
    variants["flash only (pre-gathered)"] = lambda: flash_only(kg, vg)(q, idx, cq, ck, mq, mk, scale)
    variants["gather only"] = lambda: (kp.index_select(0, idx), vp.index_select(0, idx))
    variants["gather+repeat+varlen_attn"] = lambda: varlen_rep(q, idx, cq, ck, mq, mk, scale)
    for name, fn in variants.items():
        try:
            o = fn()
            err = None
            if ref is not None and isinstance(o, torch.Tensor):
                err = float((o.float() - ref.float()).abs().max())
            ms = median_s(fn, dev, reps=20, warmup=3) * 1e3
            row = {"case": label, "variant": name, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "max_err": err}
        except Exception as exc:  # noqa: BLE001
            row = {"case": label, "variant": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out_rows.append(row)
        print(json.dumps(row), flush=True)

os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "attention_shapes.json"), "w") as f:
    json.dump(out_rows, f, indent=1)
