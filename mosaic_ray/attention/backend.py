"""The attention backend: per layer, store the step's new K/V by slot, then one ragged attention
call for every sequence of the step (nano-vllm's `store_kvcache` + one varlen call).

`AttentionMetadata` is tensors only (plus two host-side bounds for the launch grid), built once per
step by `build_metadata` and read by every layer; nothing here loops over sequences or builds a
boolean mask per call on a GPU. The kernel (`mosaic_ray.kernels.ragged_attention`) runs on CUDA
(or under the Triton interpreter); its torch reference serves CPU machines, tested equal.

Dense steps (`AttentionMetadata.dense`: every slot attended is valid for every KV head, as in a
frame ingest, which attends the stream's sink + window and its own new tokens) take FlashAttention
instead on CUDA: the step's K/V gathered by slot into one packed copy, then one varlen call with
grouped heads and causal alignment at the end of each sequence, the semantics of the ragged
kernel. On the H200 at 7b-shape, 22 streams x 146 frame tokens over 2.2k slots: 0.63 ms against
1.54 ms for the ragged kernel (the gather is 0.08 ms of it; `docs/benchmarks.md` 10.5). A question
step never is dense (its retrieved set has padding), so it keeps the ragged kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_ray.cache.device_pool import DeviceKVPool
from mosaic_ray.kernels.ragged_attention import ragged_attention


@dataclass(slots=True)
class AttentionMetadata:
    """One step's ragged batch. Sequence s has queries cu_q[s]:cu_q[s+1] of the packed tokens and
    attends slots kv_indices[cu_kv[s]:cu_kv[s+1]], its own new tokens last (`slot_mapping` says
    where each new token's K/V is stored, in packed order)."""

    slot_mapping: torch.Tensor  # [T] int64
    kv_indices: torch.Tensor  # [M] int64
    cu_q: torch.Tensor  # [S + 1] int32
    cu_kv: torch.Tensor  # [S + 1] int32
    max_q: int
    max_kv: int
    q_bounds: list[tuple[int, int]]  # host copy of cu_q as (start, end) pairs
    splits: int | None = None  # split-KV factor; None = chosen per call (a CUDA graph fixes it)
    dense: bool = False  # every attended slot is valid for every KV head (the caller vouches)


def build_metadata(kv_lists: list[torch.Tensor], new_slots: list[torch.Tensor], device: torch.device,
                   dense: bool = False) -> AttentionMetadata:
    """kv_lists[s]: the slots sequence s attends before this step; new_slots[s]: where its new
    tokens go (they are attended too, causally, after kv_lists[s]). `dense`: the caller knows every
    slot of kv_lists is valid for every KV head (resident tokens only, no retrieved set)."""
    q_lens = [int(n.numel()) for n in new_slots]
    kv_lens = [int(k.numel()) + q for k, q in zip(kv_lists, q_lens)]
    parts = []
    for k, n in zip(kv_lists, new_slots):
        parts += [k, n]
    cu = torch.tensor([[0, 0]] + [[a, b] for a, b in zip(q_lens, kv_lens)], dtype=torch.int64).cumsum(0)
    cu = cu.to(torch.int32).T.contiguous().to(device, non_blocking=True)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.cat(new_slots).to(device, torch.int64),
        kv_indices=torch.cat(parts).to(device, torch.int64),
        cu_q=cu[0], cu_kv=cu[1], max_q=max(q_lens), max_kv=max(kv_lens),
        q_bounds=list(zip(starts[:-1], starts[1:])),
        dense=dense,
    )


def store_kv(pool: DeviceKVPool, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata) -> None:
    """key/value [T, Hkv, D] of the step's new tokens into their slots (marked valid)."""
    slots = meta.slot_mapping
    pool.k[layer].index_copy_(0, slots, key.to(pool.k.dtype))
    pool.v[layer].index_copy_(0, slots, value.to(pool.v.dtype))
    pool.valid[layer].index_fill_(0, slots, True)


def flash_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """FlashAttention's varlen kernel can take these queries and keys (CUDA, 16-bit, head_dim a
    multiple of 8 up to 256, query heads a multiple of the KV heads)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def attend_dense(pool: DeviceKVPool, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """A dense step's attention: K/V gathered by slot, one FlashAttention varlen call (query i of
    a sequence with n queries over L slots sees j <= L - n + i, as the ragged kernel)."""
    k = pool.k[layer].index_select(0, meta.kv_indices)
    v = pool.v[layer].index_select(0, meta.kv_indices)
    out = torch.ops.aten._flash_attention_forward(q, k, v, meta.cu_q, meta.cu_kv, meta.max_q, meta.max_kv,
                                                  0.0, True, False, scale=scale)
    return out[0]


def attend(pool: DeviceKVPool, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]: every sequence over its slots in one call."""
    if meta.dense and meta.max_q > 1 and flash_supported(q, pool.k[layer]):
        return attend_dense(pool, layer, q, meta, scale)
    # CPU tensors take the torch reference even under TRITON_INTERPRET (the interpreter is for the
    # kernel's own tests, far too slow for a model's forward)
    return ragged_attention(q, pool.k[layer], pool.v[layer], pool.valid[layer], meta.kv_indices, meta.cu_q,
                            meta.cu_kv, scale, meta.max_q, meta.max_kv, splits=meta.splits, backend="auto" if q.is_cuda else "torch")
