"""Moving one stream's exported tensors from a source shard to a target shard, bit-exact.

Two transports, one contract (`TransferOffer` -> `receive`):

- "distributed": a two-rank torch.distributed group formed for this one transfer (rank 0 source,
  rank 1 target) on a TCPStore the source opens on a free port. CUDA tensors go over NCCL
  (GPU to GPU). Host tensors (the pinned pool's K/V) go over NCCL too when the source has a GPU
  (`host_via="nccl"`: staged through the GPUs in chunks of `STAGE_BYTES`, NVLink instead of TCP),
  else over gloo. Standalone process-group objects are used, never the default group, so one actor
  can take part in many transfers, one after another or at once, and nothing global is left behind.
- "object_store": the source `ray.put`s host copies; the target `ray.get`s them. The fallback
  when a group cannot form (no route between the nodes, a firewall, a timeout).

Invariants: tensors travel as raw bytes (any dtype, bf16 and bool included, arrive bit-identical);
with `verify`, the target compares a fingerprint of every tensor with the source's (`fingerprint`:
position-weighted 64-bit sums of its bytes, computed where the tensor lives, so a GPU tensor is
checked on the GPU) and raises `MigrationError` on any difference; the source's tensors are never
modified. `TransferStats` says where the time went.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
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
    device: str  # "cpu" or "cuda": where the source holds it and where the target puts it
    nbytes: int
    digest: str | None  # `fingerprint` of the bytes when verifying


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
    host_via: str = "gloo"  # how host tensors travel under "distributed": "gloo" | "nccl"


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (a view when already contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    return buf.view(getattr(torch, spec.dtype)).reshape(spec.shape)


STAGE_BYTES = 256 << 20  # host bytes staged through the GPU per NCCL message
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 (golden-ratio constant) as a signed int64
_FP_CHUNK = 1 << 24  # 64-bit words per fingerprint step (128 MiB of temporaries)


def fingerprint(t: torch.Tensor) -> str:
    """A 128-bit fingerprint of the tensor's bytes: the wrapping int64 sum of its 8-byte words and
    the sum of each word times an odd function of its index. Catches flipped, lost, truncated and
    reordered bytes; not a cryptographic hash. Computed on the GPU when there is one (a host
    tensor is copied there chunk by chunk: a shard actor has one CPU thread, a GPU reads it at
    tens of GB/s), else on the CPU; the result is the same."""
    b = byte_view(t)
    nbytes = b.numel()
    pad = (-nbytes) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    w = b.view(torch.int64)
    dev = _local_device("cuda") if torch.cuda.is_available() else w.device
    plain = torch.zeros((), dtype=torch.int64, device=dev)
    mixed = torch.zeros((), dtype=torch.int64, device=dev)
    for start in range(0, w.numel(), _FP_CHUNK):
        part = w[start : start + _FP_CHUNK].to(dev)
        idx = torch.arange(start, start + part.numel(), dtype=torch.int64, device=dev)
        plain += part.sum()
        mixed += (part * (idx * _MIX + 1 | 1)).sum()
    return f"{nbytes}:{int(plain) & (2**64 - 1):016x}{int(mixed) & (2**64 - 1):016x}"


def _backend(device: str, host_via: str) -> str:
    return "nccl" if device == "cuda" or host_via == "nccl" else "gloo"


@dataclass(slots=True)
class TransferStats:
    """Seconds per phase of one transfer, as one side saw them."""

    fingerprint_s: float = 0.0
    connect_s: float = 0.0  # process groups formed, their communicator included (`_Groups.get`)
    transfer_s: float = 0.0
    nbytes: int = 0
    by_backend: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"fingerprint_s": self.fingerprint_s, "connect_s": self.connect_s, "transfer_s": self.transfer_s,
                "nbytes": self.nbytes, **{f"bytes_{k}": v for k, v in self.by_backend.items()}}


def _group(store: dist.Store, backend: str, rank: int, timeout: datetime.timedelta) -> Any:
    prefixed = dist.PrefixStore(f"mosaic/{backend}", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


class _Groups:
    """The transfer's process groups, one per backend, formed when first needed."""

    def __init__(self, store: dist.Store, rank: int, timeout_s: float, stats: TransferStats) -> None:
        self.store, self.rank, self.stats = store, rank, stats
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.groups: dict[str, Any] = {}

    def get(self, backend: str) -> Any:
        if backend not in self.groups:
            t0 = time.perf_counter()
            group = self.groups[backend] = _group(self.store, backend, self.rank, self.timeout)
            # one byte from rank 0 to rank 1 forms the communicator now (NCCL's is lazy), so
            # connect and transfer are timed apart
            ping = torch.zeros(1, dtype=torch.uint8, device=_local_device("cuda" if backend == "nccl" else "cpu"))
            (group.send([ping], 1, 0) if self.rank == 0 else group.recv([ping], 0, 0)).wait()
            if backend == "nccl":
                torch.cuda.synchronize()
            self.stats.connect_s += time.perf_counter() - t0
        return self.groups[backend]

    def count(self, backend: str, nbytes: int) -> None:
        self.stats.nbytes += nbytes
        self.stats.by_backend[backend] = self.stats.by_backend.get(backend, 0) + nbytes

    def finish(self) -> None:
        if "nccl" in self.groups:
            torch.cuda.synchronize()


class MigrationSource:
    """The source side of one stream's transfer. Holds the exported state until the move is
    finished or aborted, so a failed distributed transfer can be offered again by object store."""

    def __init__(self, stream_id: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor], verify: bool) -> None:
        self.stream_id = stream_id
        self.meta = meta
        self.names = sorted(tensors)
        self.tensors = tensors
        self.stats = TransferStats()
        t0 = time.perf_counter()
        self.specs = [
            TensorSpec(
                name=n,
                shape=tuple(tensors[n].shape),
                dtype=str(tensors[n].dtype).removeprefix("torch."),
                device=tensors[n].device.type,
                nbytes=tensors[n].numel() * tensors[n].element_size(),
                digest=fingerprint(tensors[n]) if verify else None,
            )
            for n in self.names
        ]
        self.stats.fingerprint_s = time.perf_counter() - t0
        self._store: dist.TCPStore | None = None
        self._host_via = "gloo"

    def offer(self, transport: str, host: str, timeout_s: float) -> TransferOffer:
        offer = TransferOffer(self.stream_id, self.meta, self.specs, transport, timeout_s=timeout_s)
        if transport == "distributed":
            timeout = datetime.timedelta(seconds=timeout_s)
            self._store = dist.TCPStore(host, 0, 2, True, timeout=timeout, wait_for_workers=False)
            offer.host, offer.port = host, self._store.port
            self._host_via = offer.host_via = "nccl" if torch.cuda.is_available() else "gloo"
        elif transport == "object_store":
            offer.tensors_ref = ray.put({n: t.detach().cpu() for n, t in self.tensors.items()})
        else:
            raise ValueError(f"unknown transport {transport!r}")
        return offer

    def send(self, timeout_s: float) -> TransferStats:
        """Rank 0 of the distributed transfer: blocks until the target has received everything."""
        if self._store is None:
            raise MigrationError("send() before offer('distributed')")
        groups = _Groups(self._store, 0, timeout_s, self.stats)
        t0 = time.perf_counter()
        for tag, spec in enumerate(self.specs):
            backend = _backend(spec.device, self._host_via)
            group = groups.get(backend)
            data = byte_view(self.tensors[spec.name])
            if spec.device == "cpu" and backend == "nccl":  # staged through this GPU, chunk by chunk
                for k in range(0, data.numel(), STAGE_BYTES):
                    group.send([data[k : k + STAGE_BYTES].to(_local_device("cuda"))], 1, tag).wait()
            elif data.numel():
                group.send([data], 1, tag).wait()
            groups.count(backend, spec.nbytes)
        groups.finish()
        self.stats.transfer_s = time.perf_counter() - t0 - self.stats.connect_s
        return self.stats

    def close(self) -> None:
        self._store = None


def receive(offer: TransferOffer, verify: bool) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """The target side: fetch every tensor of `offer`, placed on its spec's device, and check it."""
    stats = TransferStats()
    t0 = time.perf_counter()
    if offer.transport == "distributed":
        tensors = _receive_distributed(offer, stats)
    elif offer.transport == "object_store":
        host = ray.get(offer.tensors_ref)
        tensors = {s.name: host[s.name].to(_local_device(s.device)) for s in offer.specs}
        stats.nbytes = sum(s.nbytes for s in offer.specs)
    else:
        raise MigrationError(f"unknown transport {offer.transport!r}")
    stats.transfer_s = time.perf_counter() - t0 - stats.connect_s
    if verify:
        t0 = time.perf_counter()
        for spec in offer.specs:
            if spec.digest is not None and fingerprint(tensors[spec.name]) != spec.digest:
                raise MigrationError(f"tensor {spec.name!r} of stream {offer.stream_id!r} arrived corrupted")
        stats.fingerprint_s = time.perf_counter() - t0
    return tensors, stats


def _receive_distributed(offer: TransferOffer, stats: TransferStats) -> dict[str, torch.Tensor]:
    if offer.host_via == "nccl" and not torch.cuda.is_available():
        raise MigrationError("the source sends host tensors over NCCL but this shard has no GPU")
    store = dist.TCPStore(offer.host, offer.port, 2, False, timeout=datetime.timedelta(seconds=offer.timeout_s))
    groups = _Groups(store, 1, offer.timeout_s, stats)
    tensors: dict[str, torch.Tensor] = {}
    for tag, spec in enumerate(offer.specs):
        backend = _backend(spec.device, offer.host_via)
        group = groups.get(backend)
        buf = torch.empty(spec.nbytes, dtype=torch.uint8, device=_local_device(spec.device))
        if spec.device == "cpu" and backend == "nccl":
            for k in range(0, spec.nbytes, STAGE_BYTES):
                part = torch.empty(min(STAGE_BYTES, spec.nbytes - k), dtype=torch.uint8, device=_local_device("cuda"))
                group.recv([part], 0, tag).wait()
                buf[k : k + part.numel()].copy_(part)
        elif spec.nbytes:
            group.recv([buf], 0, tag).wait()
        groups.count(backend, spec.nbytes)
        tensors[spec.name] = from_bytes(buf, spec)
    groups.finish()
    return tensors


def _local_device(device: str) -> torch.device:
    # A shard actor sees exactly its own GPU(s); "cuda" means its first one.
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
