import pytest

from mosaic_ray.model.registry import load_model


@pytest.fixture(scope="session")
def tiny_adapter():
    return load_model("tiny", "cpu")
