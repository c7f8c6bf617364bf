"""The attention backend: per layer, store the step's new K/V by slot, then one ragged attention
call for every sequence of the step (nano-vllm's `store_kvcache` + one varlen call).

`AttentionMetadata` is tensors only (plus two host-side bounds for the launch grid), built once per
step by `build_metadata` and read by every layer; nothing here loops over sequences or builds a
boolean mask per call on a GPU. The kernel (`mosaic_ray.kernels.ragged_attention`) runs on CUDA
(or under the Triton interpreter); its torch reference serves CPU machines, tested equal.
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


def build_metadata(kv_lists: list[torch.Tensor], new_slots: list[torch.Tensor], device: torch.device) -> AttentionMetadata:
    """kv_lists[s]: the slots sequence s attends before this step; new_slots[s]: where its new
    tokens go (they are attended too, causally, after kv_lists[s])."""
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
    )


def store_kv(pool: DeviceKVPool, layer: int, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata) -> None:
    """key/value [T, Hkv, D] of the step's new tokens into their slots (marked valid)."""
    slots = meta.slot_mapping
    pool.k[layer].index_copy_(0, slots, key.to(pool.k.dtype))
    pool.v[layer].index_copy_(0, slots, value.to(pool.v.dtype))
    pool.valid[layer].index_fill_(0, slots, True)


def attend(pool: DeviceKVPool, layer: int, q: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]: every sequence over its slots in one call."""
    # CPU tensors take the torch reference even under TRITON_INTERPRET (the interpreter is for the
    # kernel's own tests, far too slow for a model's forward)
    return ragged_attention(q, pool.k[layer], pool.v[layer], pool.valid[layer], meta.kv_indices, meta.cu_q,
                            meta.cu_kv, scale, meta.max_q, meta.max_kv, splits=meta.splits, backend="auto" if q.is_cuda else "torch")
