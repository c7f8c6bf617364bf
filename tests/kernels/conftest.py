"""Kernel tests run the Triton kernels under the interpreter on CPU tensors (CI), or compiled on a
GPU when started with TRITON_INTERPRET=0 on a CUDA machine (then gathers read a pinned host pool
through UVA, the production path).

TRITON_INTERPRET must be set before mosaic_ray.kernels (hence triton.jit) is imported: this
conftest is loaded before the test modules of this folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mosaic_ray.kernels import backend  # noqa: E402


def _kernel_device() -> torch.device:
    if backend.INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise RuntimeError(
        "mosaic_ray.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
        "the kernels cannot run; run tests/kernels in its own pytest process"
    )


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel inputs and outputs live: CPU under the interpreter, else the GPU."""
    return _kernel_device()


@pytest.fixture(scope="session")
def host_pinned(device) -> bool:
    """Whether the host pool should be pinned (read in place through UVA on a GPU)."""
    return device.type == "cuda"
