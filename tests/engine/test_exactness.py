"""The worst bugs show here: chunked streaming must give the model's own answers."""

import numpy as np
import pytest
import torch

from engine_fixtures import frames, make_engine
from mosaic_ray.engine.interface import AskRequest

QUESTION = "What happened in the video?"
MAX_TOKENS = 12


def _reference_ids(adapter, imgs, question, max_tokens):
    """model.generate on the whole sequence (prefix + frames + question), plain transformers."""
    tok = adapter.tokenizer
    ids = tok.encode(adapter.prefix_text(), add_special_tokens=False)
    pixels, grid = adapter.preprocess(imgs)
    types = [0] * len(ids)
    for g in grid:
        n = int(g.prod()) // adapter.merge**2
        ids += [adapter.vision_start_id] + [adapter.image_token_id] * n + [adapter.vision_end_id]
        types += [0] + [1] * n + [0]
    prompt, _ = adapter.question_text(question)
    q = tok.encode(prompt, add_special_tokens=False)
    ids += q
    types += [0] * len(q)
    dev = adapter.device
    input_ids = torch.tensor([ids], device=dev)
    with torch.no_grad():
        out = adapter.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels.to(dev),
            image_grid_thw=grid.to(dev), mm_token_type_ids=torch.tensor([types], device=dev), max_new_tokens=max_tokens,
            do_sample=False, eos_token_id=adapter.eos_token_ids, pad_token_id=tok.pad_token_id,
        )
    gen = out[0, len(ids):].tolist()
    return [t for t in gen if t not in adapter.eos_token_ids]


def test_full_retrieval_equals_model_generate(tiny_adapter_on):
    tiny_adapter = tiny_adapter_on
    imgs = frames(3, seed=1)
    engine = make_engine(tiny_adapter, "full")
    engine.open_stream("s")
    engine.append_frames("s", imgs[:2], [0.0, 1.0])
    engine.append_frames("s", imgs[2:], [2.0])
    got = engine.answer("s", AskRequest(QUESTION, max_tokens=MAX_TOKENS)).token_ids
    want = _reference_ids(tiny_adapter, imgs, QUESTION, MAX_TOKENS)
    assert got == want and len(got) > 0


@pytest.mark.parametrize("scoring,fill", [("mean", "prefix"), ("max", "skip")])
@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
def test_full_budget_equals_full(tiny_adapter_on, method, scoring, fill):
    tiny_adapter = tiny_adapter_on
    imgs = frames(12, seed=2)
    answers = {}
    for m in ("full", method):
        engine = make_engine(tiny_adapter, m, window=24, sink=4, budget=100_000, scoring=scoring, fill=fill)
        engine.open_stream("s")
        for i in range(0, 12, 3):
            engine.append_frames("s", imgs[i : i + 3], [float(i), i + 1.0, i + 2.0])
        assert engine.stream_info("s")["past_tokens"] > 0
        answers[m] = engine.answer("s", AskRequest(QUESTION, max_tokens=MAX_TOKENS)).token_ids
    assert answers[method] == answers["full"]


def test_streams_are_isolated(tiny_adapter):
    engine = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=40)
    alone = make_engine(tiny_adapter, "cluster", window=24, sink=4, budget=40)
    imgs = frames(6, seed=3)
    for e in (engine, alone):
        e.open_stream("a")
        e.append_frames("a", imgs, [float(i) for i in range(6)])
    engine.open_stream("b")
    engine.append_frames("b", frames(9, seed=99), [float(i) for i in range(9)])
    engine.append_text("b", "garbage " * 5, 9.5)
    with pytest.raises(Exception):
        engine.append_frames("b", [np.zeros((5, 5), np.uint8)], [10.0])
    a1 = engine.answer("a", AskRequest(QUESTION, max_tokens=MAX_TOKENS)).token_ids
    a2 = alone.answer("a", AskRequest(QUESTION, max_tokens=MAX_TOKENS)).token_ids
    assert a1 == a2


@pytest.mark.parametrize("method", ["token", "cluster"])
def test_prefetch_changes_no_answer(tiny_adapter, method):
    """Cross-layer prefetch is exact: rows it guessed wrong are fetched at the layer."""
    imgs = frames(12, seed=4)
    got = {}
    for prefetch in (False, True):
        engine = make_engine(tiny_adapter, method, window=24, sink=4, budget=30, engine={"prefetch": prefetch})
        if prefetch:
            from mosaic_ray.engine.prefetch import Prefetcher

            Prefetcher.install(engine.adapter)
        engine.open_stream("s")
        for i in range(0, 12, 3):
            engine.append_frames("s", imgs[i : i + 3], [float(i), i + 1.0, i + 2.0])
        a = engine.answer("s", AskRequest(QUESTION, max_tokens=MAX_TOKENS))
        got[prefetch] = (a.token_ids, a.fetched_tokens)
        if prefetch:
            assert a.prefetch_hit_rate is not None and 0.0 <= a.prefetch_hit_rate <= 1.0
    assert got[True] == got[False]
