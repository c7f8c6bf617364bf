"""Whole-stream snapshots for migration between engines (shards).

A snapshot is {"meta": plain data, "tensors": {name: Tensor}}: the stream's counters, its resident
sink + window, its retriever's device state, and the contents of the host-pool slabs it owns.
Importing allocates fresh slabs in the target pool and rewrites every slab reference, so the
stream's clusters move whole (a stream never spans shards) and answers after a move are identical.
Tensors stay where the stream keeps them (resident window and retriever state on the engine's
device, pool slabs on the host), as copies: the runtime's transport sends device tensors over NCCL
and host tensors over gloo (or Ray's object store), and `import_stream` puts each where the target
engine keeps it.
"""

from __future__ import annotations

from typing import Any

import torch

from mosaic_ray.cache.stream_cache import StreamCache
from mosaic_ray.engine.snapshot_delta import POOL_TENSORS, PoolRows
from mosaic_ray.engine.stream_state import StreamState

_RESIDENT = ("k", "v", "order", "time", "pos", "block", "text")
# Per retriever: (object path, tensor attributes, plain attributes, slab-table attribute or None)
_RETRIEVER_FIELDS = {
    "full": [],  # its past is device-pool slots: exported as K/V by `FullRetriever.export_past`
    "token": [("", ("keys",), ("past_tokens",), None),
              ("log", ("slabs", "order", "time", "pos", "block"), ("size",), "slabs")],
    "frame": [("", ("rep_sum", "start", "count", "t_min", "t_max", "block_id"), ("past_tokens", "num_blocks"), None),
              ("log", ("slabs", "order", "time", "pos", "block"), ("size",), "slabs")],
    "cluster": [("", (), ("past_tokens",), None),
                ("index", ("num_clusters", "count", "centroid", "sumsq", "t_min", "t_max", "slabs", "split_flag",
                           "key_count", "key_sum", "key_sumsq", "text_keys", "text_slot", "kmin", "kmax",
                           "coactivated"),
                 ("capacity",), "slabs")],
}
_OPTIONAL = ("text_keys", "text_slot", "kmin", "kmax", "coactivated")  # absent from older snapshots
_COUNTERS = ("next_pos", "tokens", "frames", "texts", "questions", "clock", "block")


def _owner(obj, path):
    return getattr(obj, path) if path else obj


def export_stream(state: StreamState, since: int | None = None) -> dict[str, Any]:
    """The stream's whole state; with `since` (a pool epoch, `HostPool.changed_since`) the pool
    part holds only the slabs changed after it, and "pool.changed" names them ("pool.slab_ids"
    still lists every slab the stream owns): an increment (`snapshot_delta.py`)."""
    cache = state.cache
    cache.offload()  # staged tokens are offloaded first: a snapshot holds a sink, a window and a past
    retriever = cache.retriever
    k, v = cache.kv_pool.read(cache.slots)
    tensors: dict[str, torch.Tensor] = {"resident.k": k, "resident.v": v}
    tensors.update({f"resident.{n}": getattr(cache, n).clone() for n in _RESIDENT[2:]})
    if retriever.method == "full":
        tensors.update({f"retriever.past.{n}": t for n, t in retriever.export_past().items()})
    meta: dict[str, Any] = {"counters": {c: getattr(state, c) for c in _COUNTERS}, "total_tokens": cache.total_tokens,
                            "method": retriever.method, "plain": {}}
    for path, tnames, pnames, _ in _RETRIEVER_FIELDS[retriever.method]:
        obj = _owner(retriever, path)
        for n in tnames:
            tensors[f"retriever.{path}.{n}"] = getattr(obj, n).clone()
        for n in pnames:
            meta["plain"][f"{path}.{n}"] = getattr(obj, n)
    pool = retriever.pool
    pool.sync()  # the GPU's writes into the pool have landed before the host copies the slabs
    slabs = (pool.owner == retriever.owner).nonzero().flatten()
    tensors["pool.slab_ids"] = slabs
    if since is not None:
        meta["generation"], meta["since"] = pool.epoch, since
        slabs = tensors["pool.changed"] = pool.changed_since(slabs, since)
    for n in POOL_TENSORS:  # indexing by a tensor copies: one pass over the bytes
        tensors[f"pool.{n}"] = getattr(pool, n)[slabs]
    return {"meta": meta, "tensors": tensors}


def import_stream(stream_id: str, snapshot: dict[str, Any], cache: StreamCache) -> StreamState:
    meta, tensors = snapshot["meta"], snapshot["tensors"]
    retriever = cache.retriever
    if meta["method"] != retriever.method:
        raise ValueError(f"snapshot uses retrieval {meta['method']!r}, this engine {retriever.method!r}")
    pool, dev = retriever.pool, cache.device
    old = tensors["pool.slab_ids"].to("cpu", torch.int64)
    new = pool.allocate(old.numel(), retriever.owner)
    rows = snapshot.get("pool_rows") or PoolRows.whole(tensors)  # a merge of parts leaves them in place
    rows.write_into({n: getattr(pool, n) for n in POOL_TENSORS}, new)
    remap = torch.full((int(old.max()) + 1 if old.numel() else 1,), -1, dtype=torch.int64)
    remap[old] = new
    # copies, never views: the stream mutates its tensors in place, and a snapshot may be imported
    # more than once
    cache.load_resident(*(tensors.get(f"resident.{n}") for n in _RESIDENT))  # no text: an older snapshot
    if retriever.method == "full":
        retriever.import_past({n: tensors[f"retriever.past.{n}"] for n in ("k", "v", "order", "time", "pos")})
    cache.total_tokens = meta["total_tokens"]
    for path, tnames, pnames, slab_attr in _RETRIEVER_FIELDS[retriever.method]:
        obj = _owner(retriever, path)
        for n in tnames:
            t = tensors.get(f"retriever.{path}.{n}")
            if t is None and n in _OPTIONAL:  # a snapshot from before text units / key bounds
                continue
            if n == slab_attr:
                t = t.cpu()
                t = torch.where(t >= 0, remap[t.clamp(min=0)], -1)
            setattr(obj, n, t.to(dev, copy=True))
        for n in pnames:
            setattr(obj, n, meta["plain"][f"{path}.{n}"])
    if retriever.method == "cluster":
        retriever.index.restore_bounds()  # bounds the snapshot lacks, or this engine does not keep
    state = StreamState(stream_id, cache)
    for c, value in meta["counters"].items():
        setattr(state, c, value)
    return state
