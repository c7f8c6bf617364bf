"""GPU only: question prefills replayed from piecewise CUDA graphs give the eager engine's answers,
token for token, for every retrieval method: several prompts packed into one padded bucket, a
question whose retrieval fills the working set at every layer, and a prompt too long for any
bucket (eager)."""

import numpy as np
import pytest
import torch

from mosaic_ray.config import CacheConfig, EngineConfig
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.stream_engine import StreamEngine
from mosaic_ray.model.registry import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LONG = "Tell me everything about the scene, " * 12 + "what happened?"


def _answers(adapter, method: str, prefill_graph_tokens: int):
    cfg = EngineConfig(model="tiny", device="cuda", prefill_graph_tokens=prefill_graph_tokens,
                       kv_pool={"capacity_tokens": 1 << 16},
                       cache=CacheConfig(retrieval=method, window_tokens=40, sink_tokens=4, budget_tokens=24,
                                         pool={"capacity_bytes": 32 << 20}))
    engine = StreamEngine(cfg, adapter=adapter)
    rng = np.random.default_rng(0)
    for i, n in enumerate((3, 7, 12)):
        engine.open_stream(f"s{i}")
        frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(n)]
        engine.append_frames(f"s{i}", frames, [float(t) for t in range(n)])
    packed = engine.answer_batch([(f"s{i}", AskRequest("What happened?", max_tokens=8)) for i in range(3)])
    alone = engine.answer_batch([("s2", AskRequest("And after that, what?", max_tokens=8))])
    long = engine.answer_batch([("s1", AskRequest(LONG, max_tokens=4))])
    return [a.token_ids for a in packed + alone + long], dict(engine.runner.counters)


@pytest.mark.parametrize("method", ["full", "frame", "token", "cluster"])
def test_prefill_graph_equals_eager(method):
    adapter = load_model("tiny", "cuda")
    eager, eager_counts = _answers(adapter, method, 0)
    graphed, counts = _answers(adapter, method, 128)
    assert eager_counts["prefill_graph_steps"] == 0
    assert counts["prefill_graph_steps"] >= 2  # the packed prompts and the lone one
    assert counts["eager_prefill_steps"] >= 1  # the long prompt (~465 tokens) fits no bucket up to 128
    assert graphed == eager
