"""Reused host buffers for MPI: page-locked (CuPy pinned) on a GPU machine, huge-page backed otherwise."""
import mmap
import threading

import numpy

from .xp import cupy_module

HUGE_PAGE = 2 << 20
# From this size host buffers for MPI get transparent huge pages. An MPI copy between
# processes (CMA) pins every page it moves: at np=2 with MPICH an in-place Allreduce of 2 MB
# took 312 us from huge pages and 424 us from 4 KiB pages.
HUGE_FROM = 1 << 20


def empty_host(nbytes):
    """A 1-D uint8 host array of ``nbytes`` for MPI to move: huge-page backed from HUGE_FROM.

    The memory is an anonymous private mapping, 2 MiB aligned and advised for transparent
    huge pages (Linux with THP "madvise" or "always"); elsewhere a plain NumPy array.
    """
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_FROM or advise is None:
        return numpy.empty(nbytes, dtype=numpy.uint8)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = numpy.frombuffer(region, dtype=numpy.uint8)  # keeps the mapping alive
    offset = -whole.ctypes.data % HUGE_PAGE
    try:
        region.madvise(advise, offset, size)
    except OSError:  # THP compiled out: plain pages, still correct
        pass
    return whole[offset:offset + nbytes]


def empty_pinned(nbytes):
    """A 1-D uint8 host array of ``nbytes``, page-locked when a GPU is present."""
    cp = cupy_module()
    if cp is None:
        return empty_host(nbytes)
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
