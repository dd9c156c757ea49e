"""Arrays from other frameworks (PyTorch, JAX, ...) through DLPack, without a copy where memory allows.

``native(x)`` gives the NumPy (host) or CuPy (device) array that shares
``x``'s memory; ``restore(x, result)`` turns a result back into ``x``'s type,
again sharing memory. NumPy and CuPy arrays pass through untouched, so the
common path costs one type check.
"""
import sys

import numpy

from .xp import cupy_module, is_cupy

# DLPack device types (dlpack.h): memory NumPy can address, and memory CuPy can
_HOST_DEVICES = (1, 3)        # kDLCPU, kDLCUDAHost (pinned)
_CUDA_DEVICES = (2, 13)       # kDLCUDA, kDLCUDAManaged


def is_foreign(x):
    """True for an array that is neither NumPy nor CuPy but speaks DLPack."""
    return not isinstance(x, numpy.ndarray) and not is_cupy(x) and hasattr(x, "__dlpack__")


def _detached(x):
    # PyTorch refuses to export a tensor that requires grad; the detached tensor shares its memory
    return x.detach() if getattr(x, "requires_grad", False) else x


def native(x, what="collective"):
    """The NumPy or CuPy array sharing ``x``'s memory (``x`` itself when it already is one)."""
    if not is_foreign(x):
        return x
    x = _detached(x)
    kind, device_id = x.__dlpack_device__()
    if kind in _HOST_DEVICES:
        try:
            return numpy.from_dlpack(x)
        except (RuntimeError, BufferError, TypeError) as exc:  # e.g. bfloat16, which NumPy cannot import
            raise TypeError(f"{what} cannot take this {type(x).__name__} ({getattr(x, 'dtype', '?')}) "
                            f"through DLPack: {exc}; cast it to float32 first") from exc
    if kind in _CUDA_DEVICES:
        cp = cupy_module()
        if cp is None:
            raise TypeError(f"{what} got a {type(x).__name__} on CUDA device {device_id}, but cupy is not "
                            f"installed or sees no device; install mpidp[cuda12] or move the tensor to the CPU")
        return cp.from_dlpack(x)
    raise TypeError(f"{what} got a {type(x).__name__} on DLPack device type {kind}; only CPU and CUDA "
                    f"memory are supported")


def _from_dlpack(like):
    """The ``from_dlpack`` of ``like``'s framework, or None when it has none."""
    top = type(like).__module__.partition(".")[0]
    if top in ("jax", "jaxlib"):
        return sys.modules["jax.numpy"].from_dlpack if "jax.numpy" in sys.modules else None
    return getattr(sys.modules.get(top), "from_dlpack", None)


def restore(like, result):
    """``result`` (NumPy/CuPy, or a tuple or list of them) as arrays of ``like``'s type."""
    if not is_foreign(like):
        return result
    if isinstance(result, (tuple, list)):
        return type(result)(restore(like, r) for r in result)
    if not hasattr(result, "__dlpack__"):
        return result
    convert = _from_dlpack(like)
    return result if convert is None else convert(result)
