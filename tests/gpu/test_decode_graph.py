"""GPU only: decode replayed from CUDA graphs gives the eager engine's answers, token for token,
for questions of several streams of different lengths decoding together (padded bucket)."""

import numpy as np
import pytest
import torch

from mosaic_ray.config import CacheConfig, EngineConfig
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.stream_engine import StreamEngine
from mosaic_ray.model.registry import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["full", "cluster"])
def test_graph_decode_equals_eager(method):
    adapter = load_model("tiny", "cuda")
    rng = np.random.default_rng(0)
    answers = {}
    for graphs in (False, True):
        cfg = EngineConfig(model="tiny", device="cuda", cuda_graphs=graphs, kv_pool={"capacity_tokens": 1 << 16},
                           cache=CacheConfig(retrieval=method, window_tokens=40, sink_tokens=4, budget_tokens=24,
                                             pool={"capacity_bytes": 32 << 20}))
        engine = StreamEngine(cfg, adapter=adapter)
        for i, n in enumerate((3, 7, 12)):  # three streams: 3 questions pad to the bucket of 4
            engine.open_stream(f"s{i}")
            frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(n)]
            rng = np.random.default_rng(0)  # the same frames for both engines
            engine.append_frames(f"s{i}", frames, [float(t) for t in range(n)])
        got = engine.answer_batch([(f"s{i}", AskRequest("What happened?", max_tokens=10)) for i in range(3)])
        answers[graphs] = [a.token_ids for a in got]
        if graphs:
            assert engine.runner.counters["graph_steps"] > 0
    assert answers[True] == answers[False]


def test_closing_in_the_graph_then_a_follow_up_equals_eager():
    """Answers of different lengths: the short ones close (one closing token per graph step)
    while the long ones decode; the follow-up questions, which attend those committed Q/As,
    answer as in the eager engine."""
    adapter = load_model("tiny", "cuda")
    answers = {}
    for graphs in (False, True):
        cfg = EngineConfig(model="tiny", device="cuda", cuda_graphs=graphs, kv_pool={"capacity_tokens": 1 << 16},
                           cache=CacheConfig(retrieval="full", window_tokens=4096, sink_tokens=4,
                                             pool={"capacity_bytes": 32 << 20}))
        engine = StreamEngine(cfg, adapter=adapter)
        rng = np.random.default_rng(1)
        for i in range(3):
            engine.open_stream(f"s{i}")
            frames = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(4)]
            engine.append_frames(f"s{i}", frames, [float(t) for t in range(4)])
        first = engine.answer_batch([(f"s{i}", AskRequest("What happened?", max_tokens=2 + 5 * i)) for i in range(3)])
        again = engine.answer_batch([(f"s{i}", AskRequest("And then?", max_tokens=6)) for i in range(3)])
        answers[graphs] = [a.token_ids for a in first + again]
    assert answers[True] == answers[False]
