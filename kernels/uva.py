"""Reading the pinned host pool from the GPU in place (UVA), without a C++ extension.

Why it works: torch pins with cudaHostAlloc (or cudaHostRegister); on 64-bit Linux with unified
addressing that memory is mapped into every device's address space, so a kernel can load from it
and each load becomes a PCIe read (H100, measured: ~42 GB/s at 128-byte rows, ~49.5 GB/s at >= 1 KB).

Two ways in, both ending at the driver's host->device pointer translation:
1. Kernels: pass the pinned CPU tensor itself to a Triton kernel. Triton's launcher
   (triton 3.6, backends/nvidia/driver.py, `getPointer`) calls
   cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER) on `data_ptr()` and launches with the
   pointer it returns; for pageable memory it raises
   ValueError("Pointer argument (at i) cannot be accessed from Triton (cpu tensor?)").
   The op wrappers check `is_pinned()` first so the common mistake gets a clear message.
2. torch ops: `device_view(host)` returns a CUDA tensor aliasing the pinned memory. vLLM does this
   with a C++ op (`get_accelerator_view_from_cpu_tensor`: cudaHostGetDevicePointer + from_blob);
   `torch.cuda.cudart()` does not bind cudaHostGetDevicePointer, so we ask libcuda through ctypes
   for the same translation and hand torch the pointer through `__cuda_array_interface__`.

Invariant: a view aliases the host tensor and keeps it alive; writes through either side are seen
by the other once the writing stream is synchronized.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3  # cuda.h, CUpointer_attribute


class UVAError(RuntimeError):
    """Pinned host memory could not be mapped for device access."""


def uva_problem(t: torch.Tensor) -> str | None:
    """Why `t` cannot be read in place by a kernel on a CUDA device, or None if it can."""
    if t.is_cuda:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not t.is_pinned():
        return "host tensor is not pinned (UVA reads need page-locked memory: HostPool pins when CUDA is present)"
    return None


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:  # pragma: no cover - GPU machines only
        raise UVAError(f"cannot load libcuda.so.1 for the host->device pointer lookup: {e}") from e
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    lib.cuPointerGetAttribute.restype = ctypes.c_int
    return lib


def device_pointer(host_ptr: int, device: torch.device) -> int:
    """The device address of a pinned host address (what cudaHostGetDevicePointer returns)."""
    # The driver call needs the device's primary context bound to this thread.
    torch.cuda.synchronize(device)
    out = ctypes.c_uint64(0)
    rc = _libcuda().cuPointerGetAttribute(ctypes.byref(out), _CU_POINTER_ATTRIBUTE_DEVICE_POINTER, host_ptr)
    if rc != 0:
        raise UVAError(f"cuPointerGetAttribute(DEVICE_POINTER, 0x{host_ptr:x}) failed with CUresult {rc}")
    return int(out.value)


class _CudaArray:
    """Just enough of the CUDA array interface for torch.as_tensor to wrap a device address."""

    def __init__(self, owner: torch.Tensor, ptr: int, nbytes: int) -> None:
        self._owner = owner  # keeps the pinned storage alive as long as the view
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def device_view(host: torch.Tensor, device: torch.device | str | int | None = None) -> torch.Tensor:
    """A CUDA tensor with `host`'s shape, strides and dtype that reads/writes `host`'s pinned memory."""
    problem = uva_problem(host)
    if problem is not None:
        raise UVAError(f"device_view: {problem}")
    if host.is_cuda:
        return host
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if host.numel() == 0:
        return torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
    if any(s < 0 for s in host.stride()):
        raise UVAError("device_view: negative strides are not supported")
    elem = host.element_size()
    span = (sum((n - 1) * s for n, s in zip(host.shape, host.stride())) + 1) * elem
    ptr = device_pointer(host.data_ptr(), device)
    with torch.cuda.device(device):
        raw = torch.as_tensor(_CudaArray(host, ptr, span), device=device)
    if raw.data_ptr() != ptr:  # torch copied (e.g. the memory belongs to another device's context)
        raise UVAError(f"device_view: torch made a copy on {raw.device} instead of aliasing host memory")
    return raw.view(host.dtype).as_strided(host.shape, host.stride())
