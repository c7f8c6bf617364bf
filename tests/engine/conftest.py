import pytest
import torch

from mosaic_ray.model.registry import load_model

_ADAPTERS = {}


@pytest.fixture(scope="session")
def tiny_adapter():
    return load_model("tiny", "cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def tiny_adapter_on(request):
    """The tiny model on the CPU (torch attention reference) and, where there is a GPU, on CUDA
    (the Triton attention kernel, fp32 in IEEE precision): the exactness tests run on both."""
    if request.param not in _ADAPTERS:
        _ADAPTERS[request.param] = load_model("tiny", request.param)
    return _ADAPTERS[request.param]
