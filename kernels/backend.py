"""Which implementation runs an op: its Triton kernel or its torch reference.

Every op in this package takes `backend=`:
  "auto"   the kernel where it can run (a CUDA device, or the Triton interpreter on CPU tensors),
           else the reference. A fallback that happens on a CUDA device is *unexpected*: it warns
           once per (op, reason) and is counted in `FALLBACKS`, so a benchmark can report it.
  "triton" the kernel or an error (`KernelUnavailableError`): benchmarks and tests use this.
  "torch"  the reference.

Interpreter mode is fixed when this module is imported: `@triton.jit` reads TRITON_INTERPRET at
decoration time, so a kernel decorated without it cannot run on CPU tensors later, whatever the
environment says then. Tests set TRITON_INTERPRET=1 before importing anything from this package.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the op modules)

    HAS_TRITON = True
except ImportError:  # CPU machines without the `gpu` extra
    triton = None
    tl = None
    HAS_TRITON = False

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")

# How often each op fell back to its reference on a CUDA device, by "op: reason".
FALLBACKS: Counter[str] = Counter()
_warned: set[str] = set()


class KernelUnavailableError(RuntimeError):
    """backend='triton' was asked for but the kernel cannot run on these tensors."""


def _interpret_at_import() -> bool:
    if not HAS_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.4 had no knobs
        import os

        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


INTERPRET = _interpret_at_import()


def _fix_interpreter_index() -> None:
    """triton <= 3.6's interpreter converts a scalar to a Python int with int(ndarray of shape
    (1,)), which numpy >= 2.4 refuses, so `range(0, n, BLOCK)` with a runtime `n` fails under
    TRITON_INTERPRET=1 (triton-lang/triton#9171). Apply the upstream one-line fix (squeeze first).
    Interpreter only; compiled kernels are untouched."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mosaic_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._mosaic_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_index()


def choose(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch' for these tensors. CPU tensors without the interpreter go to the
    reference silently (that is the CPU path, not a failure)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = None
    on_cuda = any(t.is_cuda for t in tensors)
    if not HAS_TRITON:
        reason = "triton is not installed"
    elif not on_cuda and not INTERPRET:
        reason = "all tensors are on CPU and TRITON_INTERPRET was not set when mosaic_ray.kernels was imported"
    if reason is None:
        return "triton"
    if backend == "triton":
        raise KernelUnavailableError(f"{op}: {reason}")
    if on_cuda:
        fallback(op, reason, backend)
    return "torch"


def fallback(op: str, reason: str, backend: str) -> None:
    """Record (and, once per reason, warn about) running the reference where the kernel should run.
    With backend='triton' this raises instead."""
    if backend == "triton":
        raise KernelUnavailableError(f"{op}: {reason}")
    key = f"{op}: {reason}"
    FALLBACKS[key] += 1
    if key not in _warned:
        _warned.add(key)
        msg = f"mosaic_ray.kernels: {key}; using the torch reference (slower)"
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """The one device all these tensors live on, or a clear error."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listing}")
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} dtype must be one of {[str(d) for d in allowed]}, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} shape expected {tuple(shape)}, got {tuple(t.shape)}")


def check_last_dim_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} needs stride 1 in its last dim, got strides {t.stride()}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
