"""GPU only: on CUDA the engine's attention is the Triton kernel (fp32 in IEEE precision for the
tiny float32 model): `full` still answers exactly as `model.generate`, and a full budget gives every
method `full`'s answer."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the engine tests' fixtures and reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def gpu_adapter():
    from mosaic_ray.model.registry import load_model

    return load_model("tiny", "cuda")


def _engine(adapter, method, **cache):
    from mosaic_ray.config import CacheConfig, EngineConfig
    from mosaic_ray.engine.stream_engine import StreamEngine

    cfg = EngineConfig(model="tiny", device="cuda", kv_pool={"capacity_tokens": 1 << 16},
                       cache=CacheConfig(retrieval=method, pool={"capacity_bytes": 16 << 20}, **cache))
    return StreamEngine(cfg, adapter=adapter)


def test_full_equals_model_generate_on_gpu(gpu_adapter):
    from test_exactness import QUESTION, _reference_ids
    from engine_fixtures import frames
    from mosaic_ray.engine.interface import AskRequest

    imgs = frames(3, seed=1)
    engine = _engine(gpu_adapter, "full")
    engine.open_stream("s")
    engine.append_frames("s", imgs[:2], [0.0, 1.0])
    engine.append_frames("s", imgs[2:], [2.0])
    got = engine.answer("s", AskRequest(QUESTION, max_tokens=12)).token_ids
    assert got == _reference_ids(gpu_adapter, imgs, QUESTION, 12) and got


@pytest.mark.parametrize("method", ["frame", "token", "cluster"])
def test_full_budget_equals_full_on_gpu(gpu_adapter, method):
    from engine_fixtures import frames
    from mosaic_ray.engine.interface import AskRequest

    imgs = frames(12, seed=2)
    answers = {}
    for m in ("full", method):
        engine = _engine(gpu_adapter, m, window_tokens=24, sink_tokens=4, budget_tokens=100_000)
        engine.open_stream("s")
        for i in range(0, 12, 3):
            engine.append_frames("s", imgs[i : i + 3], [float(i), i + 1.0, i + 2.0])
        answers[m] = engine.answer("s", AskRequest("What happened?", max_tokens=12)).token_ids
    assert answers[method] == answers["full"]
