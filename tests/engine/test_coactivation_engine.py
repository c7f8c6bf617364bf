"""Co-activation through the engine (ClusterConfig.coactivation): a question's retrieval logs what
it attended and the engine's next maintenance regroups it into exact units; the units travel in
snapshots, and an engine with it off is unchanged."""

import torch

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest

Q = AskRequest("Describe the scene.", max_tokens=6)
COACT = {"cluster": {"coactivation": 0.25, "coactivation_unit": 2, "coactivation_max_share": 1.0}}
OFF = {"cluster": {"coactivation": 0.0}}


def _exact_tokens(engine, sid="s") -> int:
    ix = engine.streams[sid].cache.retriever.index
    return int((ix.text_slot >= 0).sum())


def _filled(tiny_adapter, **cache):
    e = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, **cache)
    e.open_stream("s")
    e.append_frames("s", frames(10, seed=4), [float(i) for i in range(10)])
    return e


def test_a_question_regroups_what_it_attended_into_exact_units(tiny_adapter):
    e, off = _filled(tiny_adapter, **COACT), _filled(tiny_adapter, **OFF)  # the same stream, on and off
    for engine in (e, off):
        first = engine.answer("s", Q).token_ids
        engine.append_frames("s", frames(2, seed=5), [10.0, 11.0])  # ingest steps run the maintenance
    ix = e.streams["s"].cache.retriever.index
    assert not ix.attended and not off.streams["s"].cache.retriever.index.attended
    assert _exact_tokens(e) > _exact_tokens(off)  # text units in both, attended members in e
    # every past token is in exactly one cluster, each once
    for g in range(ix.layout.groups):
        used = int(ix.num_clusters[g])
        rows, valid = ix.member_rows(torch.full((used,), g), torch.arange(used))
        orders = ix.pool.read(rows[valid])[2]
        assert orders.numel() == e.streams["s"].cache.past_tokens == orders.unique().numel()
    assert len(first) > 0 and len(e.answer("s", Q).token_ids) > 0
    # the units travel with the stream
    snap = e.export_stream("s")
    dst = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=30, **COACT)
    dst.import_stream("s", snap)
    got = dst.streams["s"].cache.retriever.index
    assert torch.equal(got.text_slot, ix.text_slot) and torch.equal(got.text_keys, ix.text_keys)
    assert torch.equal(got.coactivated, ix.coactivated) and int(ix.coactivated.sum()) > 0
    assert dst.answer("s", Q).token_ids == e.answer("s", Q).token_ids
