"""Moving one stream's exported tensors from a source shard to a target shard, bit-exact.

Two transports, one contract (`TransferOffer` -> `receive`):

- "distributed": a two-rank torch.distributed group formed for this one transfer (rank 0 source,
  rank 1 target) on a TCPStore the source opens on a free port. CUDA tensors go over NCCL
  (GPU to GPU), host tensors (the pinned pool's K/V) over gloo. Standalone process-group objects
  are used, never the default group, so one actor can take part in many transfers, one after
  another or at once, and nothing global is left behind.
- "object_store": the source `ray.put`s host copies; the target `ray.get`s them. The fallback
  when a group cannot form (no route between the nodes, a firewall, a timeout).

Invariants: tensors travel as raw bytes (any dtype, bf16 and bool included, arrive bit-identical);
with `verify`, the target compares the SHA-256 of every tensor with the source's and raises
`MigrationError` on any difference; the source's tensors are never modified.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.distributed as dist

from mosaic_ray.runtime.errors import MigrationError


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16", "float32", ...
    device: str  # "cpu" or "cuda": the transport and where the target puts it
    nbytes: int
    digest: str | None


@dataclass(slots=True)
class TransferOffer:
    """What the target needs to fetch a stream; plain data (and an ObjectRef) that Ray can ship."""

    stream_id: str
    meta: dict[str, Any]
    specs: list[TensorSpec]
    transport: str  # "distributed" | "object_store"
    host: str = ""
    port: int = 0
    tensors_ref: Any = None  # ray.ObjectRef of {name: cpu tensor} for "object_store"
    timeout_s: float = 60.0


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view when already contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return buf.view(getattr(torch, spec.dtype)).reshape(spec.shape)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(byte_view(t).cpu().numpy().data).hexdigest()


def _backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def _group(store: dist.Store, backend: str, rank: int, timeout: datetime.timedelta) -> Any:
    prefixed = dist.PrefixStore(f"mosaic/{backend}", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


class MigrationSource:
    """The source side of one stream's transfer. Holds the exported state until the move is
    finished or aborted, so a failed distributed transfer can be offered again by object store."""

    def __init__(self, stream_id: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], verify: bool) -> None:
        self.stream_id = stream_id
        self.meta = meta
        self.names = sorted(tensors)
        self.tensors = tensors
        self.specs = [
            TensorSpec(
                name=n,
                shape=tuple(tensors[n].shape),
                dtype=str(tensors[n].dtype).removeprefix("torch."),
                device=tensors[n].device.type,
                nbytes=tensors[n].numel() * tensors[n].element_size(),
                digest=digest(tensors[n]) if verify else None,
            )
            for n in self.names
        ]
        self._store: dist.TCPStore | None = None

    def offer(self, transport: str, host: str, timeout_s: float) -> TransferOffer:
        offer = TransferOffer(self.stream_id, self.meta, self.specs, transport, timeout_s=timeout_s)
        if transport == "distributed":
            timeout = datetime.timedelta(seconds=timeout_s)
            self._store = dist.TCPStore(host, 0, 2, True, timeout=timeout, wait_for_workers=False)
            offer.host, offer.port = host, self._store.port
        elif transport == "object_store":
            offer.tensors_ref = ray.put({n: t.detach().cpu() for n, t in self.tensors.items()})
        else:
            raise ValueError(f"unknown transport {transport!r}")
        return offer

    def send(self, timeout_s: float) -> None:
        """Rank 0 of the distributed transfer: blocks until the target has received everything."""
        if self._store is None:
            raise MigrationError("send() before offer('distributed')")
        timeout = datetime.timedelta(seconds=timeout_s)
        groups: dict[str, Any] = {}
        for tag, spec in enumerate(self.specs):
            backend = _backend(spec.device)
            if backend not in groups:
                groups[backend] = _group(self._store, backend, 0, timeout)
            groups[backend].send([byte_view(self.tensors[spec.name])], 1, tag).wait()
        if "nccl" in groups:
            torch.cuda.synchronize()

    def close(self) -> None:
        self._store = None


def receive(offer: TransferOffer, verify: bool) -> dict[str, torch.Tensor]:
    """The target side: fetch every tensor of `offer`, placed on its spec's device, and check it."""
    if offer.transport == "distributed":
        tensors = _receive_distributed(offer)
    elif offer.transport == "object_store":
        host = ray.get(offer.tensors_ref)
        tensors = {s.name: host[s.name].to(_local_device(s.device)) for s in offer.specs}
    else:
        raise MigrationError(f"unknown transport {offer.transport!r}")
    if verify:
        for spec in offer.specs:
            if spec.digest is not None and digest(tensors[spec.name]) != spec.digest:
                raise MigrationError(f"tensor {spec.name!r} of stream {offer.stream_id!r} arrived corrupted")
    return tensors


def _receive_distributed(offer: TransferOffer) -> dict[str, torch.Tensor]:
    timeout = datetime.timedelta(seconds=offer.timeout_s)
    store = dist.TCPStore(offer.host, offer.port, 2, False, timeout=timeout)
    groups: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for tag, spec in enumerate(offer.specs):
        backend = _backend(spec.device)
        if backend not in groups:
            groups[backend] = _group(store, backend, 1, timeout)
        buf = torch.empty(spec.nbytes, dtype=torch.uint8, device=_local_device(spec.device))
        groups[backend].recv([buf], 0, tag).wait()
        tensors[spec.name] = from_bytes(buf, spec)
    if "nccl" in groups:
        torch.cuda.synchronize()
    return tensors


def _local_device(device: str) -> torch.device:
    # A shard actor sees exactly its own GPU(s); "cuda" means its first one.
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
