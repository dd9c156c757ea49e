"""Arrays as MPI-ready contiguous host (or CUDA-aware device) buffers, and pieced transfers."""
import numpy
from mpi4py import MPI

from .. import _env
from ..backend.device import sync_before_mpi
from ..backend.pinned import pool, staged
from ..backend.xp import is_cupy
from . import runtime
from .ops import mpi_type

# Large reductions go in pieces that stay in cache: on the development machine one 64 MiB
# MPICH Allreduce took 21 ms and the same in 1 MiB pieces 5.8 ms (scripts/bench_collectives.py
# measures it; MPIDP_PIECE_BYTES or set_piece_bytes() overrides).
DEFAULT_PIECE_BYTES = 1 << 20
MAX_COUNT = 1 << 30  # elements per MPI call: under 2^31 for MPIs without MPI-4 large counts
_piece_bytes = _env.get("MPIDP_PIECE_BYTES") or DEFAULT_PIECE_BYTES


def piece_bytes():
    return _piece_bytes


def set_piece_bytes(nbytes):
    """Bytes per piece of a large allreduce (0 restores the default)."""
    global _piece_bytes
    _piece_bytes = int(nbytes) or DEFAULT_PIECE_BYTES


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
    step = max(1, min(MAX_COUNT, _piece_bytes // recv.itemsize))
    for i in range(0, n, step):
        j = min(n, i + step)
        source = MPI.IN_PLACE if send is None else spec(send[i:j])
        comm.Allreduce(source, spec(recv[i:j]), op=mpi_op)


def bcast_pieces(comm, buf, root):
    n = buf.size
    for i in range(0, n, MAX_COUNT):
        comm.Bcast(spec(buf[i:i + MAX_COUNT]), root=root)


def empty_host(shape, dtype):
    return numpy.empty(shape, dtype=dtype)
