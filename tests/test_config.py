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
    with pytest.raises(ValueError) as err:
        factory()
    assert field in str(err.value) and "got" in str(err.value)


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
