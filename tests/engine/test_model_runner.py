"""The model runner takes mixed batches: an ingest chunk of one stream and a question prompt of
another in one packed forward store the K/V and give the logits that each alone gives."""

import torch

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.stream_state import Segment, assemble
from mosaic_ray.model.attention import StreamStep


def _segments(engine):
    a, b = engine.streams["a"], engine.streams["b"]
    feats = engine.adapter.encode_frames(frames(1, seed=7))
    ingest = assemble(a, [engine.adapter.frame_chunk(feats[0], 5.0)], [5.0])
    chunk = engine.adapter.ids_chunk(engine.adapter.tokenizer.encode("What is there?", add_special_tokens=False))
    prompt = Segment(chunk.embeds, chunk.positions + b.next_pos, torch.zeros(chunk.size), torch.zeros(chunk.size, dtype=torch.long), chunk.span)
    return [(a, ingest), (b, prompt)]


def test_mixed_batch_equals_each_alone(tiny_adapter):
    engine = make_engine(tiny_adapter, "full", window=4096)
    for sid, n in (("a", 3), ("b", 2)):
        engine.open_stream(sid)
        engine.append_frames(sid, frames(n, seed=len(sid) + n), [float(i) for i in range(n)])
    work = _segments(engine)
    alone, alone_slots = [], []
    for state, seg in work:
        slots = state.cache.reserve(seg.size)
        logits = engine.runner.forward([seg], [StreamStep(state.cache, seg.size)], [state.cache.slots], [slots], logits=True)
        alone.append(logits[0])
        alone_slots.append(slots)
    slots = [state.cache.reserve(seg.size) for state, seg in work]
    mixed = engine.runner.forward([seg for _, seg in work], [StreamStep(s.cache, seg.size) for s, seg in work],
                                  [s.cache.slots for s, _ in work], slots, logits=True)
    pool = engine.kv_pool
    for i in range(2):
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.k[:, slots[i]], pool.k[:, alone_slots[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.v[:, slots[i]], pool.v[:, alone_slots[i]], atol=1e-5, rtol=1e-5)


def test_ingest_steps_are_dense_only_over_valid_slots(tiny_adapter):
    """Frame ingests are marked dense (`AttentionMetadata.dense`: FlashAttention on a GPU, which
    cannot skip invalid entries): every slot they attend must be valid in every layer and KV head,
    also after questions, whose retrieved sets hold invalid padding, freed their slots for reuse."""
    from mosaic_ray.engine.interface import AskRequest

    engine = make_engine(tiny_adapter, "cluster", window=64, sink=4, budget=24)
    real, seen = engine.runner.forward, []

    def forward(segs, steps, kv_lists, new_slots, logits=False, dense=False):
        if dense:
            slots = torch.cat(kv_lists)
            seen.append(bool(engine.kv_pool.valid[:, slots].all()))
        return real(segs, steps, kv_lists, new_slots, logits=logits, dense=dense)

    engine.runner.forward = forward
    engine.open_stream("a")
    for i in range(4):
        engine.append_frames("a", frames(2, seed=i), [2.0 * i, 2.0 * i + 1])
        engine.answer("a", AskRequest(question="What is there?", max_tokens=3))
    assert len(seen) >= 4 and all(seen)
