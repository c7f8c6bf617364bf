"""Tensors moved by torch.distributed (gloo, two ranks in two threads) arrive bit-exact."""

from __future__ import annotations

import threading

import pytest
import torch

from mosaic_ray.runtime.errors import MigrationError
from mosaic_ray.runtime.actors import migration
from mosaic_ray.runtime.actors.migration import MigrationSource, byte_view, fingerprint, receive

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64,
          torch.int64, torch.int32, torch.uint8, torch.bool]
TIMEOUT_S = 20


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in DTYPES:
        base = torch.randn(5, 7, generator=g) * 100
        out[f"t_{dt}"] = base.to(dt)
    out["empty"] = torch.empty(0, 3)
    out["scalar"] = torch.tensor(2.5)
    out["non_contiguous"] = torch.randn(6, 4, generator=g).t()
    out["nan_payload"] = torch.tensor([0x7FC00001, 0x7F800001], dtype=torch.int32).view(torch.float32)
    return out


def _move(src: MigrationSource) -> dict[str, torch.Tensor]:
    offer = src.offer("distributed", "127.0.0.1", TIMEOUT_S)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            src.send(TIMEOUT_S)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    out, stats = receive(offer, verify=True)
    sender.join(TIMEOUT_S)
    assert not errors
    assert stats.nbytes == sum(s.nbytes for s in offer.specs) == stats.by_backend.get("gloo", 0)
    return out


def test_distributed_transfer_is_bit_exact_and_leaves_the_source_alone():
    tensors = _tensors()
    before = {k: byte_view(v).clone() for k, v in tensors.items()}
    out = _move(MigrationSource("s", {"k": 1}, tensors, verify=True))
    assert sorted(out) == sorted(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert torch.equal(byte_view(out[name]), byte_view(t)), name
        assert torch.equal(byte_view(t), before[name]), name


def test_a_corrupted_tensor_is_refused():
    src = MigrationSource("s", {}, {"x": torch.arange(10.0)}, verify=True)
    spec = src.specs[0]
    src.specs[0] = type(spec)(spec.name, spec.shape, spec.dtype, spec.device, spec.nbytes, "0" * 64)
    with pytest.raises(MigrationError, match="corrupted"):
        _move(src)


def test_the_fingerprint_sees_flipped_swapped_and_missing_bytes(monkeypatch):
    monkeypatch.setattr(migration, "_FP_CHUNK", 5)  # several chunks, the last one partial
    t = torch.randint(-1000, 1000, (37,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    base = fingerprint(t)
    assert fingerprint(t.clone()) == base and fingerprint(t.view(torch.int32)) == base  # the bytes, not the dtype
    flipped = t.clone()
    flipped[20] ^= 1 << 40
    swapped = t.clone()
    swapped[[3, 30]] = t[[30, 3]]
    odd = byte_view(t)[:-3]  # not a whole number of words: padded, and its length differs
    assert len({base, fingerprint(flipped), fingerprint(swapped), fingerprint(t[:-1]), fingerprint(odd)}) == 5
    assert fingerprint(torch.empty(0)) != fingerprint(torch.zeros(1))
