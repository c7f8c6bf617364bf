"""The runtime's config tree: the real engine's kwargs validated at parse time, and the limits that
must agree across shard, log replay, ingress and engine."""

import pytest
from pydantic import ValidationError

from mosaic_ray.runtime.config import RuntimeConfig
from mosaic_ray.serve.config import AppConfig

FAKE = "tests.runtime.fake_engine:FakeEngine"


def _runtime(**parts):
    return RuntimeConfig.model_validate(parts)


def test_the_real_engines_kwargs_are_an_engine_config_checked_at_parse_time():
    with pytest.raises(ValidationError) as err:
        _runtime(engine={"kwargs": {"cache": {"retreival": "token", "window_tokens": 0}}})
    locs = {tuple(e["loc"]) for e in err.value.errors()}
    assert locs == {("engine", "kwargs", "cache", "retreival"), ("engine", "kwargs", "cache", "window_tokens")}
    cfg = _runtime(engine={"kwargs": {"cache": {"retrieval": "token"}}}).engine.engine_config
    assert cfg.cache.retrieval == "token" and cfg.cache.pool.slab_tokens == 16


def test_another_factory_keeps_its_own_kwargs_and_no_cross_checks():
    spec = _runtime(engine={"factory": FAKE, "kwargs": {"frame_delay_s": 0.1}}, shard={"max_coalesce_frames": 4096})
    assert spec.engine.engine_config is None and spec.engine.kwargs == {"frame_delay_s": 0.1}


@pytest.mark.parametrize("parts,needle", [
    ({"shard": {"max_coalesce_frames": 300}}, "shard.max_coalesce_frames (300) must be at most"),
    ({"durability": {"replay_batch_frames": 300}}, "durability.replay_batch_frames (300) must be at most"),
    ({"engine": {"kwargs": {"max_frames_per_call": 32}}}, "shard.max_coalesce_frames (64) must be at most"),
    ({"engine": {"kwargs": {"max_deferred_frames": 16}}}, "max_deferred_frames (16) must be at least"),
    ({"shard": {"max_stream_pending_frames": 512}}, "must be at most shard.max_pending_frames (256)"),
    ({"engine": {"kwargs": {"max_streams": 64, "kv_pool": {"capacity_tokens": 100_000}}}},
     "64 streams x 3088 resident tokens"),
])
def test_limits_that_cannot_work_together_are_refused_naming_both(parts, needle):
    with pytest.raises(ValidationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _runtime(**parts)


def test_limits_that_fit_pass():
    _runtime(engine={"kwargs": {"max_deferred_frames": 0, "max_streams": 32, "kv_pool": {"capacity_tokens": 100_000}}},
             shard={"max_coalesce_frames": 256, "max_pending_frames": 1024, "max_stream_pending_frames": 1024},
             durability={"replay_batch_frames": 256})


def test_an_ingress_batch_must_fit_one_engine_call():
    with pytest.raises(ValidationError, match=r"ingress.max_frames_per_batch \(256\) must be at most"):
        AppConfig.model_validate({"runtime": {"engine": {"kwargs": {"max_frames_per_call": 128},
                                                         }, "shard": {"max_coalesce_frames": 64}}})
    AppConfig.model_validate({"runtime": {"engine": {"kwargs": {"max_frames_per_call": 128}}},
                              "ingress": {"max_frames_per_batch": 128}})
