import pytest

from mosaic_ray.config import CacheConfig, ClusterConfig, KVLayout, PoolConfig


@pytest.mark.parametrize(
    "factory,field",
    [
        (lambda: CacheConfig(retrieval="nearest"), "CacheConfig.retrieval"),
        (lambda: CacheConfig(budget_ratio=0.0), "CacheConfig.budget_ratio"),
        (lambda: CacheConfig(window_tokens=0), "CacheConfig.window_tokens"),
        (lambda: ClusterConfig(variance_ratio=-1), "ClusterConfig.variance_ratio"),
        (lambda: ClusterConfig(split_size=64, max_size=32), "ClusterConfig.max_size"),
        (lambda: PoolConfig(slab_tokens=0), "PoolConfig.slab_tokens"),
        (lambda: PoolConfig(ram_fraction=1.5), "PoolConfig.ram_fraction"),
        (lambda: KVLayout(0, 1, 8), "KVLayout.num_layers"),
        (lambda: KVLayout(1, 1, 8, dtype="int8"), "dtype"),
    ],
)
def test_out_of_range_names_field_and_range(factory, field):
    """The message names the config, the field and what it must be (pydantic: 'CacheConfig' then
    the field on its own line; KVLayout: 'KVLayout.num_layers must be in ..., got 0')."""
    with pytest.raises(ValueError) as err:
        factory()
    cls, _, name = field.rpartition(".")
    text = str(err.value)
    assert (not cls or cls in text) and name in text
    assert "got" in text or "Input should be" in text or "must be at least" in text


def test_budget_ratio_and_floor():
    cfg = CacheConfig(budget_ratio=0.1, min_budget_tokens=64)
    assert cfg.budget_for(100) == 64 and cfg.budget_for(10_000) == 1000
    assert CacheConfig(budget_tokens=7).budget_for(10_000) == 7


def test_nested_dicts_become_configs():
    cfg = CacheConfig(cluster={"split_size": 32, "max_size": 64}, pool={"slab_tokens": 8})
    assert cfg.cluster.split_size == 32 and cfg.pool.slab_tokens == 8


def test_slab_tokens_follow_the_retrieval_method_unless_set():
    from mosaic_ray.config import CLUSTER_SLAB_TOKENS, DENSE_SLAB_TOKENS

    assert CacheConfig(retrieval="cluster").pool.slab_tokens == CLUSTER_SLAB_TOKENS
    for method in ("full", "frame", "token"):
        assert CacheConfig(retrieval=method).pool.slab_tokens == DENSE_SLAB_TOKENS
    assert CacheConfig(retrieval="cluster", pool={"slab_tokens": 32}).pool.slab_tokens == 32


def test_a_pool_too_small_for_max_streams_is_refused_at_construction():
    from mosaic_ray.config import EngineConfig

    with pytest.raises(ValueError, match="max_streams: 4 streams x 3088 resident tokens"):
        EngineConfig(max_streams=4, kv_pool={"capacity_tokens": 10_000})
    assert EngineConfig(max_streams=3, kv_pool={"capacity_tokens": 10_000}).check_pool_room(10_000) == 3
    assert EngineConfig(kv_pool={"capacity_tokens": 10_000}).check_pool_room(10_000) == 3  # None: what fits
    with pytest.raises(ValueError, match="cannot hold one stream"):
        EngineConfig(kv_pool={"capacity_tokens": 1000})


def test_engine_configs_are_frozen_and_import_no_torch():
    import subprocess
    import sys

    from mosaic_ray.config import EngineConfig

    cfg = EngineConfig()
    with pytest.raises(ValueError):
        cfg.prefetch = True
    assert cfg.model_copy(update={"prefetch": True}).prefetch
    code = "import sys, mosaic_ray.serve.config as c; c.LaunchConfig(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
