"""Incremental snapshots of one stream: a base, then deltas that carry only the pool slabs changed
since the part before, merged back into one whole-stream snapshot to import (`merge_parts`; an
import uses `merge_lazily`, which leaves the pool's slabs in their parts and says where: `PoolRows`).

A part is `export_stream(state, since)`: the stream's small state whole (counters, resident sink
+ window, retriever tables, text units, the `full` method's device past), and of the host pool
only the slabs changed after pool epoch `since` ("pool.changed"), with "pool.slab_ids" listing
every slab the stream owns then and meta["generation"] the pool's epoch, the `since` of the next
part. A base is the part with since = 0 (every slab).

What can change in a slab after a part held it (so what a delta must carry again), from
`HostPool`'s generations: rows appended to a cluster's (or a time log's) last, partly filled
slab; a split, which rewrites the parent's members into its first slabs and frees the rest; and
a slab freed and handed out again. Each is an `allocate` or a `write`, which stamps the slab, so a
slab whose stamp is not after `since` holds the bytes the previous part holds for it.

Invariant: `merge_parts([base, d1, ..., dk])` equals `export_stream(state)` taken at dk, tensor
for tensor (each owned slab's bytes come from the latest part that carried it), so importing it
gives the same stream as importing a whole export: the same answers, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

POOL_TENSORS = ("kv", "order", "time", "pos")  # a part's pool tensors: "pool.<name>"
COPY_CHUNK_ROWS = 4096  # slabs per copy of an import (4096 slabs of 7B shapes: 8 MiB of K/V)


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor,
              chunk: int = COPY_CHUNK_ROWS) -> None:
    """dst[dst_rows] = src[src_rows], `chunk` rows at a time: the gathered temporary is one chunk
    (a few MB, reused), never the whole part (a fresh allocation of its size costs its page
    faults, slower than the copy on a host)."""
    for start in range(0, src_rows.numel(), chunk):
        part = src_rows[start : start + chunk]
        dst[dst_rows[start : start + chunk]] = src[part].to(dst.dtype)


@dataclass(slots=True)
class PoolRows:
    """Where the pool slabs of a merged snapshot are, without copying them into one tensor:
    `owned` lists the slabs the stream owns, in order, and each source (positions in `owned`,
    rows of that part, the part's tensors) says which part holds the bytes of those slabs.
    `import_stream` writes each source straight into the engine's pool: one copy of the bytes,
    where `merge_parts` would make two (into the merged tensor, then into the pool)."""

    owned: torch.Tensor
    sources: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]

    def write_into(self, dst: dict[str, torch.Tensor], dst_rows: torch.Tensor) -> None:
        """dst[n][dst_rows[i]] = the bytes of owned slab i, for each pool tensor n ("kv", "order",
        "time", "pos"): the import's pool (`dst_rows` its freshly allocated slabs) or a merged
        snapshot's tensors (`merge_parts`)."""
        for here, src_rows, src in self.sources:
            for n in POOL_TENSORS:
                copy_rows(dst[n], dst_rows[here], src[f"pool.{n}"], src_rows)

    @staticmethod
    def whole(tensors: dict[str, torch.Tensor]) -> PoolRows:
        """The pool of one whole export (or a base): every slab from its own tensors, in order."""
        owned = tensors["pool.slab_ids"].to(torch.int64)
        every = torch.arange(owned.numel())
        return PoolRows(owned, [(every, every, tensors)])


def merge_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One whole-stream snapshot from a base and its deltas, in order. Raises ValueError when the
    chain does not hold every slab the last part owns (a part missing, or out of order)."""
    merged = merge_lazily(parts)
    rows = merged.pop("pool_rows")
    last = parts[-1]["tensors"]
    out = {n: torch.empty((rows.owned.numel(), *last[f"pool.{n}"].shape[1:]), dtype=last[f"pool.{n}"].dtype)
           for n in POOL_TENSORS}
    rows.write_into(out, torch.arange(rows.owned.numel()))
    merged["tensors"].update({f"pool.{n}": t for n, t in out.items()})
    return merged


def merge_lazily(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`merge_parts` without the pool's bytes: the merged snapshot's "pool.*" tensors are left in
    their parts, and "pool_rows" (`PoolRows`) says where each owned slab's are (what
    `import_stream` reads). Same checks, same ValueError."""
    if not parts:
        raise ValueError("no snapshot parts to merge")
    last = parts[-1]
    if parts[0]["meta"].get("since", 0) != 0:
        raise ValueError(f"the first snapshot part is a delta (since epoch {parts[0]['meta']['since']}), not a base")
    for prev, part in zip(parts, parts[1:]):
        since, generation = part["meta"].get("since"), prev["meta"].get("generation")
        if since is None or since != generation:
            raise ValueError(f"snapshot part since epoch {since} does not follow the part before (epoch {generation})")
    owned = last["tensors"]["pool.slab_ids"].to(torch.int64)
    size = int(max(int(p["tensors"]["pool.slab_ids"].max()) if p["tensors"]["pool.slab_ids"].numel() else 0
                   for p in parts)) + 1
    # where each owned slab's bytes are: (part, row in that part's pool tensors), the latest wins
    src_part = torch.full((size,), -1, dtype=torch.int64)
    src_row = torch.full((size,), -1, dtype=torch.int64)
    for i, part in enumerate(parts):
        t = part["tensors"]
        carried = t.get("pool.changed", t["pool.slab_ids"]).to(torch.int64)
        src_part[carried] = i
        src_row[carried] = torch.arange(carried.numel())
    if owned.numel() and bool((src_part[owned] < 0).any()):
        raise ValueError(f"{int((src_part[owned] < 0).sum())} slab(s) of the stream are in no snapshot part")
    tensors = {n: t for n, t in last["tensors"].items() if not n.startswith("pool.")}
    tensors["pool.slab_ids"] = owned
    which, rows = src_part[owned], src_row[owned]
    sources = []
    for i, part in enumerate(parts):
        here = (which == i).nonzero().flatten()
        if here.numel():
            sources.append((here, rows[here], part["tensors"]))
    meta = {k: v for k, v in last["meta"].items() if k not in ("generation", "since")}
    return {"meta": meta, "tensors": tensors, "pool_rows": PoolRows(owned, sources)}


def part_bytes(part: dict[str, Any]) -> tuple[int, int]:
    """(pool bytes, other bytes) of a part's tensors: what a delta saves is the first."""
    pool = other = 0
    for n, t in part["tensors"].items():
        nbytes = t.numel() * t.element_size()
        if n.startswith("pool."):
            pool += nbytes
        else:
            other += nbytes
    return pool, other
