"""Gather host-pool rows into device buffers: the one data path all four retrieval methods share.

`gather(pool, rows, device, parts)` takes rows [H, B] (-1 = padding) and returns device tensors.
On a CUDA device with pinned memory it uses the UVA Triton kernels of `mosaic_ray.kernels` when
they are importable; otherwise (CPU, tests) a plain torch index + copy. Both paths return bit-exact
the same values: the kernels are tested against this torch path.

"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaic_ray.cache.host_pool import HostPool


@dataclass(slots=True)
class Prefetched:
    """Rows [H, B] gathered ahead of need (on a side stream), with what came back; `ready` is the
    event the consumer waits on before reading `data` (None on the CPU)."""

    rows: torch.Tensor
    data: dict[str, torch.Tensor]
    ready: object = None


def gather(
    pool: HostPool,
    rows: torch.Tensor,
    device: torch.device,
    parts: str = "kv",
) -> dict[str, torch.Tensor]:
    """Read rows [H, B] from the pool. Returns {"k"?, "v"?, "order", "time", "pos"} on `device`.

    Padding rows (-1) come back as zeros (order -1). `parts` is "kv", "k" or "v": the token-level
    baseline keeps its keys on the device and fetches values only.
    """
    if rows.dim() != 2:
        raise ValueError(f"gather: rows must be [H, B], got shape {tuple(rows.shape)}")
    H, B = rows.shape
    if device.type == "cuda" and pool.pinned:
        return _gather_uva(pool, rows, device, parts)
    pool.sync()
    flat = rows.reshape(-1).to("cpu", torch.int64)
    valid = flat >= 0
    safe = flat.clamp(min=0)
    slab, off = safe // pool.slab_tokens, safe % pool.slab_tokens
    out: dict[str, torch.Tensor] = {}
    for name, idx in (("k", 0), ("v", 1)):
        if name not in parts:
            continue
        host = pool.kv[slab, idx, off]
        host[~valid] = 0
        out[name] = host.view(H, B, pool.layout.head_dim).to(device)
    order = pool.order[slab, off].masked_fill(~valid, -1)
    out["order"] = order.view(H, B).to(device)
    out["time"] = pool.time[slab, off].view(H, B).to(device)
    out["pos"] = pool.pos[slab, off].view(H, B, pool.layout.pos_dims).to(device)
    return out


def _gather_uva(pool: HostPool, rows: torch.Tensor, device: torch.device, parts: str) -> dict[str, torch.Tensor]:
    """GPU path: K/V read straight from pinned host memory by the Triton gather, metadata through
    UVA views of the pinned metadata; no host sync and no staging copy. Bit-exact with the torch path."""
    from mosaic_ray.kernels.gather_rows import gather_rows

    H, B = rows.shape
    rows_dev = rows.to(device, torch.int64)
    k, v = gather_rows(pool.kv, rows_dev, which=parts, device=device)
    out: dict[str, torch.Tensor] = {}
    if k is not None:
        out["k"] = k
    if v is not None:
        out["v"] = v
    views = pool.device_views(device)
    safe = rows_dev.clamp(min=0)
    valid = rows_dev >= 0
    slab, off = safe // pool.slab_tokens, safe % pool.slab_tokens
    out["order"] = views["order"][slab, off].masked_fill(~valid, -1)
    out["time"] = views["time"][slab, off]
    out["pos"] = views["pos"][slab, off]
    return out


def gather_into(pool: HostPool, rows: torch.Tensor, k_out: torch.Tensor | None, v_out: torch.Tensor | None,
                slots: torch.Tensor, valid_out: torch.Tensor) -> None:
    """Read rows [H, B] (-1 = padding) from the pool straight into a device-pool layer: row (h, b)
    into k_out/v_out [N, H, D] at slot slots[b] (None: that half is not read), rows >= 0 into
    valid_out [N, H]. One launch on a GPU (the UVA kernel), no staging buffer, no host sync; on
    the CPU the torch reference, bit-exact with it. Row metadata is not read (attention needs none)."""
    from mosaic_ray.kernels.gather_rows import gather_rows

    parts = ("k" if k_out is not None else "") + ("v" if v_out is not None else "")
    gpu = valid_out.is_cuda and pool.pinned
    gather_rows(pool.kv, rows, parts, k_out, v_out, out_slots=slots, out_valid=valid_out,
                backend="auto" if gpu else "torch")


def gather_times(pool: HostPool, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Timestamps [H, B] of rows [H, B] (any value at padding), read in place on a GPU."""
    safe = rows.clamp(min=0)
    slab, off = safe // pool.slab_tokens, safe % pool.slab_tokens
    if device.type == "cuda" and pool.pinned:
        return pool.device_views(device)["time"][slab, off]
    return pool.time[slab.cpu(), off.cpu()].to(device)


def merge_prefetched(pool: HostPool, rows: torch.Tensor, device: torch.device, parts: str,
                     pre: Prefetched) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows [H, B] from a prefetch where it has them (hits), from the host otherwise (misses).

    Returns (data, miss_rows): the result is bit-exact with a plain `gather(rows)`; `miss_rows`
    [H, B] (-1 elsewhere) is what was read from the host on the critical path.
    """
    if pre.ready is not None:
        torch.cuda.current_stream(device).wait_event(pre.ready)
    have, perm = torch.sort(pre.rows.to(device), dim=1)
    rows_dev = rows.to(device)
    pos = torch.searchsorted(have.contiguous(), rows_dev.contiguous()).clamp(max=max(0, have.shape[1] - 1))
    hit = (rows_dev >= 0) & (have.shape[1] > 0) & (have.gather(1, pos) == rows_dev) if have.numel() else torch.zeros_like(rows_dev, dtype=torch.bool)
    misses = torch.where(hit, -1, rows_dev)
    fresh = gather(pool, misses, device, parts)
    src = perm.gather(1, pos) if have.numel() else pos
    out = {}
    for name, t in fresh.items():
        old = pre.data[name]
        idx = src if t.dim() == 2 else src[..., None].expand_as(t)
        mask = hit if t.dim() == 2 else hit[..., None]
        out[name] = torch.where(mask, old.gather(1, idx), t)
    return out, misses
