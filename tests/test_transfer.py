"""to_device: the values and dtype asked for, from lists and tensors, on the host and on a GPU."""

import pytest
import torch

from mosaic_ray.transfer import to_device


def test_lists_and_tensors_on_the_host():
    t = to_device([1, 2, 3], "cpu", torch.int64)
    assert t.dtype == torch.int64 and t.tolist() == [1, 2, 3]
    x = torch.arange(4, dtype=torch.int32)
    assert to_device(x, "cpu") is x  # nothing to do
    y = to_device(x, "cpu", torch.float32)
    assert y.dtype == torch.float32 and y.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert to_device([[1, 2], [3, 4]], "cpu", torch.int64).shape == (2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_a_gpu_without_a_sync():
    src = torch.arange(1000, dtype=torch.int64)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device(src, "cuda")
        lst = to_device(list(range(5)), "cuda", torch.int32)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    src += 1  # the copy took its own staging buffer
    assert got.cpu().tolist() == list(range(1000))
    assert lst.dtype == torch.int32 and lst.cpu().tolist() == list(range(5))
