"""Collectives on any array that speaks DLPack: the caller's type in, the caller's type out.

A PyTorch CPU tensor becomes a NumPy view of the same memory (a CUDA tensor a
CuPy view), the collective runs on that, and the result goes back through the
tensor's framework's ``from_dlpack``; in-place collectives write straight into
the caller's memory and return the caller's tensor. NumPy and CuPy arrays skip
all of this after one type check.
"""
import functools

import numpy

from ..backend.interop import is_foreign, native, restore
from .engine import Handle, engine


_NDARRAY = {numpy.ndarray}


def chain(handle, then):
    """A Handle whose ``wait()`` returns ``then(handle.wait())`` (queued behind ``handle``)."""
    return engine.submit(lambda: None, handle.what, handle.seq, lambda _: then(handle.wait()))


def _writable(x, original, what):
    if not getattr(getattr(x, "flags", None), "writeable", True):
        raise TypeError(f"{what} writes in place, but the {type(original).__name__} it got is read-only "
                        f"(JAX arrays are immutable); use the out-of-place form, which returns a new array")
    return x


def _finish(result, then):
    return chain(result, then) if isinstance(result, Handle) else then(result)


def call(fn, x, inplace, what, *args):
    """``fn(x, *args)`` for a DLPack array ``x`` of another framework, answered in its type."""
    view = native(x, what)
    if inplace:
        _writable(view, x, what)
    return _finish(fn(view, *args), lambda r: x if inplace else restore(x, r))


def tensor_op(fn, inplace=False):
    """Let ``fn(x, ...)`` take a DLPack array ``x`` and answer in its type (``x`` itself if in place)."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if type(x) is numpy.ndarray or not is_foreign(x):
            return fn(x, *args, **kwargs)
        return call(functools.partial(fn, **kwargs), x, inplace, fn.__name__, *args)
    return wrapper


def grouped_op(fn, inplace=False):
    """Let ``fn(tensors, ...)`` take a list of DLPack arrays and answer in their types."""
    @functools.wraps(fn)
    def wrapper(tensors, *args, **kwargs):
        tensors = list(tensors)
        if set(map(type, tensors)) <= _NDARRAY or not any(map(is_foreign, tensors)):
            return fn(tensors, *args, **kwargs)
        views = [native(t, fn.__name__) for t in tensors]
        if inplace:
            for v, t in zip(views, tensors):
                _writable(v, t, fn.__name__)

        def then(results):
            return list(tensors) if inplace else [restore(t, r) for t, r in zip(tensors, results)]
        return _finish(fn(views, *args, **kwargs), then)
    return wrapper
