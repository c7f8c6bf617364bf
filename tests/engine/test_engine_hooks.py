"""The engine's public hooks for benchmarks: a cache observer given to every stream cache it makes,
an attention observer on each layer's retrieval attention, and `EngineConfig.time_fetch` (each
layer's fetch timed exactly) reaching every step, instead of benchmarks patching the engine."""

import pytest

from engine_fixtures import frames, make_engine
from mosaic_ray.cache.observer import CacheObserver
from mosaic_ray.config import CacheConfig, EngineConfig
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.stream_engine import StreamEngine


class Adopted(CacheObserver):
    def __init__(self):
        self.tokens, self.caches = 0, set()

    def on_adopt(self, cache, slots, order, time, pos, block, text):
        self.tokens += slots.numel()
        self.caches.add(id(cache))


class Attention:
    def __init__(self):
        self.calls = []

    def __call__(self, module, query, key, value, output, step):
        self.calls.append((module.layer_idx, tuple(query.shape), tuple(output.shape), step.time_fetch,
                           any(s.retrieve for s in step.streams)))


def _engine(adapter, time_fetch=False, **hooks):
    cfg = EngineConfig(model="tiny", device=str(adapter.device), kv_pool={"capacity_tokens": 1 << 16},
                       time_fetch=time_fetch, cache=CacheConfig(retrieval="token", window_tokens=32, sink_tokens=4,
                                                                budget_tokens=16, offload_batch=8,
                                                                pool={"capacity_bytes": 16 << 20}))
    return StreamEngine(cfg, adapter=adapter, **hooks)


def test_the_cache_observer_sees_every_token_each_stream_took(tiny_adapter):
    seen = Adopted()
    engine = _engine(tiny_adapter, cache_observer=seen)
    for sid in ("a", "b"):
        engine.open_stream(sid)
        engine.append_frames(sid, frames(3, seed=len(sid)), [0.0, 1.0, 2.0])
    assert seen.caches == {id(engine.streams["a"].cache), id(engine.streams["b"].cache)}
    assert seen.tokens == sum(engine.streams[s].cache.total_tokens for s in ("a", "b")) > 0


@pytest.mark.parametrize("time_fetch", [False, True])
def test_the_attention_observer_and_time_fetch_reach_every_step(tiny_adapter, time_fetch):
    seen = Attention()
    engine = _engine(tiny_adapter, time_fetch=time_fetch, attention_observer=seen)
    engine.open_stream("a")
    engine.append_frames("a", frames(6, seed=1), [float(i) for i in range(6)])
    engine.streams["a"].cache.maintain()
    assert engine.streams["a"].cache.retriever.past_tokens > 0
    seen.calls.clear()
    answer = engine.answer("a", AskRequest("What is there?", max_tokens=2))
    layers = tiny_adapter.layout.num_layers
    prefill = [c for c in seen.calls if c[4]]
    assert sorted(c[0] for c in prefill) == list(range(layers))  # each layer of the question's prefill, once
    for _, q, out, flag, _ in seen.calls:
        assert flag is time_fetch
        assert out[:2] == (1, q[2]) and out[2] == q[1]  # [1, T, Hq, D] from [1, Hq, T, D]
    assert answer.fetched_tokens > 0 and answer.fetch_s > 0


def test_no_observer_by_default(tiny_adapter):
    engine = make_engine(tiny_adapter, "token", window=32)
    assert engine.runner.attention_observer is None and engine.cache_observer is None
    engine.open_stream("a")
    assert engine.streams["a"].cache.observer is None
    assert EngineConfig().time_fetch is False


def test_time_fetch_is_a_typed_field():
    assert EngineConfig.model_validate({"time_fetch": True}).time_fetch is True
    with pytest.raises(ValueError, match="time_fetch"):
        EngineConfig.model_validate({"time_fetch": "yes"})
