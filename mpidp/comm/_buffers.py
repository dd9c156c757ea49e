"""Arrays as MPI-ready contiguous host (or CUDA-aware device) buffers, and pieced transfers."""
import weakref

import numpy
from mpi4py import MPI

from .. import _env
from ..backend.device import sync_before_mpi
from ..backend.pinned import pool, staged
from ..backend.xp import is_cupy
from . import runtime
from .ops import mpi_type

# Large reductions go in pieces: MPICH mallocs a temporary of the message's size on every
# Allreduce, and from 32 MiB glibc maps and unmaps it each call (8,194 page faults per 64 MiB
# call measured). Pieces keep it small and reused, and the best size differs by form (np=2,
# MPICH, this machine):
# - out of place (send -> new result): 512 KiB pieces beat one call at every size from 1 MiB
#   (0.66x at 1 MiB, 0.62x at 4 MiB, 0.93x at 16 MiB, 0.42x at 64 MiB; 256 KiB-16 MiB timed);
# - in place (allreduce_, gradient buckets): 2 MiB was best on ResNet-50 gradient buckets
#   (bench_gradsync.py --sweep), and bench_collectives.py --piece-sweep times single messages.
# MPIDP_PIECE_BYTES (both forms) or set_piece_bytes() overrides.
DEFAULT_PIECE_BYTES = 512 << 10
DEFAULT_INPLACE_PIECE_BYTES = 2 << 20
MAX_COUNT = 1 << 30  # elements per MPI call: under 2^31 for MPIs without MPI-4 large counts
_pieces = {False: _env.get("MPIDP_PIECE_BYTES") or DEFAULT_PIECE_BYTES,
           True: _env.get("MPIDP_PIECE_BYTES") or DEFAULT_INPLACE_PIECE_BYTES}


def piece_bytes(in_place=True):
    """Bytes per piece of a large allreduce, in place (default) or out of place."""
    return _pieces[bool(in_place)]


def set_piece_bytes(nbytes, in_place=None):
    """Set the piece size (0 restores the default) of in-place or out-of-place allreduces (None: both)."""
    for form in ((True, False) if in_place is None else (bool(in_place),)):
        default = DEFAULT_INPLACE_PIECE_BYTES if form else DEFAULT_PIECE_BYTES
        _pieces[form] = int(nbytes) or default


class Staged:
    """``array`` as something MPI can read and write: itself, or a pooled host copy for a GPU array."""

    __slots__ = ("array", "host", "_raw")

    def __init__(self, array, copy_in=True):
        self.array, self._raw = array, None
        if is_cupy(array) and not runtime.cuda_aware():
            self._raw = pool.acquire(array.nbytes)
            self.host = staged(self._raw, array.nbytes, array.dtype, array.shape)
            if copy_in:
                array.get(out=self.host)
        else:
            sync_before_mpi(array)  # mpi4py never synchronises the producing stream
            self.host = array

    def finish(self, copy_out=True):
        """Copy the host result back to the device array (if staged) and free the staging buffer."""
        if self._raw is not None:
            if copy_out:
                self.array.set(self.host)
            pool.release(self._raw)
            self._raw = None
        return self.array


def flat(a):
    return a.reshape(-1)


def spec(a, count=None, displ=None):
    """mpi4py buffer spec for contiguous ``a`` with its MPI datatype."""
    if count is None:
        return [a, mpi_type(a.dtype)]
    return [a, count, displ, mpi_type(a.dtype)]


def allreduce_pieces(comm, send, recv, mpi_op):
    """Allreduce 1-D ``recv`` (from ``send``, or in place when send is None) in cache-sized pieces."""
    n = recv.size
    if n == 0:
        return
    datatype = mpi_type(recv.dtype)
    step = max(1, min(MAX_COUNT, _pieces[send is None] // recv.itemsize))
    for i in range(0, n, step):
        source = MPI.IN_PLACE if send is None else [send[i:i + step], datatype]
        comm.Allreduce(source, [recv[i:i + step], datatype], op=mpi_op)


def bcast_pieces(comm, buf, root):
    n = buf.size
    for i in range(0, n, MAX_COUNT):
        comm.Bcast(spec(buf[i:i + MAX_COUNT]), root=root)


# New host results of at least this size reuse pooled buffers: fresh memory for every result
# page-faults on first touch (353 faults per MiB: 1 MiB allreduce 668 us instead of 143 us).
RECYCLE_BYTES = 256 << 10


def empty_result(xp, shape, dtype):
    """An uninitialised result array; big NumPy ones borrow a pooled buffer until they die.

    The buffer goes back to the pool when the last view of the result is gone: every
    view keeps NumPy's memoryview of it alive, and that memoryview's finaliser
    releases the buffer.
    """
    dtype = numpy.dtype(dtype)
    count = int(numpy.prod(shape, dtype=numpy.int64))
    if xp is not numpy or count * dtype.itemsize < RECYCLE_BYTES:
        return xp.empty(shape, dtype=dtype)
    raw = pool.acquire(count * dtype.itemsize)
    flat_result = numpy.frombuffer(memoryview(raw), dtype=dtype, count=count)
    # NumPy keeps its own memoryview as the base; every view of the result keeps it alive
    weakref.finalize(flat_result.base, pool.release, raw)
    return flat_result.reshape(shape)
