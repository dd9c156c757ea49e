"""Reused host staging buffers: page-locked (CuPy pinned) on a GPU machine, plain NumPy otherwise."""
import threading

import numpy

from .xp import cupy_module


def empty_pinned(nbytes):
    """A 1-D uint8 host array of ``nbytes``, page-locked when a GPU is present."""
    cp = cupy_module()
    if cp is None:
        return numpy.empty(nbytes, dtype=numpy.uint8)
    mem = cp.cuda.alloc_pinned_memory(max(nbytes, 1))
    return numpy.frombuffer(mem, dtype=numpy.uint8, count=nbytes)


class PinnedPool:
    """Free lists of power-of-two host buffers: after warm-up, acquire/release allocate nothing."""

    def __init__(self):
        self._free = {}
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    def acquire(self, nbytes):
        """A uint8 buffer of at least ``nbytes`` (power-of-two capacity), owned until release()."""
        cls = max(int(nbytes - 1).bit_length(), 12)
        with self._lock:
            stack = self._free.get(cls)
            if stack:
                return stack.pop()
            self.allocated_bytes += 1 << cls
        return empty_pinned(1 << cls)

    def release(self, buf):
        """Give a buffer from acquire() back."""
        with self._lock:
            self._free.setdefault(buf.nbytes.bit_length() - 1, []).append(buf)


pool = PinnedPool()


def staged(buf, nbytes, dtype, shape):
    """A view of ``nbytes`` of pooled buffer ``buf`` as an array of ``dtype`` and ``shape``."""
    return buf[:nbytes].view(dtype).reshape(shape)
