"""Which array module an array belongs to, and moves between host and device.

CuPy is imported lazily, only when a CuPy array or device is really asked for,
so NumPy-only users never pay for it and machines without a GPU never touch it.
"""
import sys

import numpy

try:  # bfloat16 as a NumPy dtype, where the user installed ml_dtypes
    import ml_dtypes as _ml_dtypes
    bfloat16 = numpy.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the install
    _ml_dtypes = None
    bfloat16 = None

_cupy = None
_cupy_checked = False


def cupy_module():
    """Return the cupy module if it imports and a CUDA device is usable, else None."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy
            if cupy.is_available():
                _cupy = cupy
        except Exception:  # ImportError, or a CUDA runtime without a driver
            _cupy = None
    return _cupy


def gpu_available():
    """True when cupy imports and sees at least one CUDA device."""
    return cupy_module() is not None


def is_cupy(x):
    """True for a CuPy array; never imports cupy."""
    if "cupy" not in sys.modules:
        return False
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy or cupy, from the arrays themselves (cupy if any of them is a CuPy array)."""
    for x in arrays:
        if is_cupy(x):
            return sys.modules["cupy"]
    return numpy


def resolve_module(xp_or_device):
    """Turn 'cpu'/'gpu'/'cuda'/'numpy'/'cupy' or a module into numpy or cupy."""
    if xp_or_device is numpy or xp_or_device in ("cpu", "numpy", "host"):
        return numpy
    if getattr(xp_or_device, "__name__", None) == "cupy" or xp_or_device in ("gpu", "cuda", "cupy", "device"):
        cp = cupy_module()
        if cp is None:
            raise RuntimeError("a GPU was asked for but cupy is not installed or sees no CUDA device; "
                               "install mpidp[cuda12] on a GPU machine or use device='cpu'")
        return cp
    raise ValueError(f"unknown array module or device {xp_or_device!r}; use 'cpu' or 'gpu'")


def asnumpy(x, out=None, stream=None):
    """A host NumPy view or copy of ``x`` (``out`` pinned + ``stream`` makes it asynchronous)."""
    if is_cupy(x):
        return x.get(stream=stream, out=out, blocking=stream is None)
    x = numpy.asarray(x)
    if out is not None:
        out[...] = x
        return out
    return x


def to_module(x, xp):
    """``x`` as an array of module ``xp`` (no copy when it already is one)."""
    if xp is numpy:
        return asnumpy(x)
    return xp.asarray(x)


def is_float_dtype(dtype):
    """float16/32/64 and bfloat16."""
    dtype = numpy.dtype(dtype)
    return dtype.kind == "f" or (bfloat16 is not None and dtype == bfloat16)
