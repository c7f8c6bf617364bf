"""Incremental snapshots on the tiny model: a base and its deltas import to the stream a whole
export gives (every tensor equal, answers token for token), a delta after a few more frames
carries far fewer pool bytes than the base, and a chain with a part missing is refused."""

import pytest
import torch

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest, InvalidInputError
from mosaic_ray.engine.snapshot_delta import merge_parts, part_bytes

Q = AskRequest("Describe the scene.", max_tokens=8)
KW = dict(window=24, sink=4, budget=30)
# A delta after 2 more frames of a 24-frame stream: the new rows land in a few new or partly
# filled slabs per (layer, head) group, plus the slabs splits rewrote; the base holds all of them.
MAX_DELTA_SHARE = 0.35


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (a pool's unused rows may hold NaN, which equals nothing)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.dtype.is_floating_point else t


def _grow(engine, start: int, n: int, seed: int) -> None:
    engine.append_frames("s", frames(n, seed=seed), [float(start + i) for i in range(n)])


def _chain(engine) -> list[dict]:
    """A base after 16 frames and a text, then deltas after 4, 2 (and a text) and 2 more frames."""
    engine.open_stream("s")
    _grow(engine, 0, 16, seed=1)
    engine.append_text("s", "a red car passes the gate", 16.5)
    parts = [engine.export_delta("s", 0)]
    for start, n, seed in ((17, 4, 2), (21, 2, 3), (23, 2, 4)):
        _grow(engine, start, n, seed)
        if start == 21:
            engine.append_text("s", "the car stops", 22.9)
        parts.append(engine.export_delta("s", parts[-1]["meta"]["generation"]))
    return parts


@pytest.mark.parametrize("method", ["cluster", "frame", "token", "full"])
def test_base_plus_deltas_is_the_whole_export_and_answers_the_same(tiny_adapter, method):
    src = make_engine(tiny_adapter, method, **KW)
    parts = _chain(src)
    whole = src.export_stream("s")
    merged = merge_parts(parts)
    assert merged["meta"] == whole["meta"]
    assert sorted(merged["tensors"]) == sorted(whole["tensors"])
    for name, t in whole["tensors"].items():
        got = merged["tensors"][name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t)), name
    a = make_engine(tiny_adapter, method, **KW)
    a.open_stream("other")  # the target pool already holds slabs: ids are remapped
    a.append_frames("other", frames(5, seed=7), [float(i) for i in range(5)])
    a.import_deltas("s", parts)
    b = make_engine(tiny_adapter, method, **KW)
    b.import_stream("s", whole)
    answer = src.answer("s", Q).token_ids
    assert a.answer("s", Q).token_ids == answer == b.answer("s", Q).token_ids
    assert a.stream_info("s")["tokens"] == src.stream_info("s")["tokens"]


def test_a_delta_after_a_few_frames_carries_far_fewer_bytes_than_the_base(tiny_adapter):
    src = make_engine(tiny_adapter, "cluster", **KW)
    src.open_stream("s")
    _grow(src, 0, 24, seed=1)
    base = src.export_delta("s", 0)
    _grow(src, 24, 2, seed=2)
    delta = src.export_delta("s", base["meta"]["generation"])
    base_pool, _ = part_bytes(base)
    delta_pool, _ = part_bytes(delta)
    print(f"\nDELTA: base pool {base_pool} B, delta pool {delta_pool} B ({delta_pool / base_pool:.1%})")
    assert 0 < delta_pool < MAX_DELTA_SHARE * base_pool
    # unchanged slabs are not carried again; the slabs the delta carries are owned ones
    assert delta["tensors"]["pool.changed"].numel() < delta["tensors"]["pool.slab_ids"].numel()
    assert set(delta["tensors"]["pool.changed"].tolist()) <= set(delta["tensors"]["pool.slab_ids"].tolist())


def test_a_chain_with_a_part_missing_is_refused_and_changes_nothing(tiny_adapter):
    src = make_engine(tiny_adapter, "cluster", **KW)
    parts = _chain(src)
    dst = make_engine(tiny_adapter, "cluster", **KW)
    for broken in (parts[:1] + parts[2:], parts[1:], [parts[0], parts[2], parts[1], parts[3]]):
        with pytest.raises(InvalidInputError):
            dst.import_deltas("s", broken)
        assert not dst.has_stream("s") and dst.pool.free_slabs == dst.pool.num_slabs
    dst.import_deltas("s", parts[:2])  # a prefix is the stream at its last part
    assert dst.has_stream("s")


def test_deltas_see_the_pools_writes_on_every_device(tiny_adapter_on):
    """On CUDA the pool's rows and generation stamps are written by the GPU through UVA views
    (`HostPool._write_from_device`, `_stamp`): base + deltas must still be the whole export."""
    src = make_engine(tiny_adapter_on, "cluster", **KW)
    parts = _chain(src)
    merged, whole = merge_parts(parts), src.export_stream("s")
    for name, t in whole["tensors"].items():
        assert torch.equal(_bits(merged["tensors"][name].cpu()), _bits(t.cpu())), name
    dst = make_engine(tiny_adapter_on, "cluster", **KW)
    dst.import_deltas("s", parts)
    assert dst.answer("s", Q).token_ids == src.answer("s", Q).token_ids
