"""Arrays as MPI-ready contiguous host (or CUDA-aware device) buffers, and pieced transfers."""
import weakref

import numpy
from mpi4py import MPI

from .. import _env
from ..backend.device import sync_before_mpi
from ..backend.pinned import pool, staged
from ..backend.xp import get_array_module, is_cupy
from . import runtime
from .ops import mpi_type

# Large reductions are a reduce-scatter then an allgather, in pieces. Each piece is split in
# one part per rank: Reduce_scatter_block leaves rank r the sum of part r, and an in-place
# Allgather hands every part to every rank. Measured against one comm.Allreduce (np=2, MPICH,
# this machine): 0.62x at 1 MiB, 0.65x at 4 MiB, 0.71x at 16 MiB, 0.32x at 64 MiB, where pieced
# Allreduce calls gave 0.8x, 0.8x, 1.0x and 0.44x. Every element is reduced on one rank only, so
# the ranks get bitwise the same result. Why pieces: MPICH mallocs a temporary of the message's
# size on every call, and from 32 MiB glibc maps and unmaps it each time (8,194 page faults per
# 64 MiB call measured); pieces keep it small, reused and in cache.
# - PIECE: the bytes of its part that each rank reduces per piece. 512 KiB was best at np=2, 3
#   and 4 (a piece is then 1, 1.5 or 2 MiB of the message). MPIDP_PIECE_BYTES or
#   set_piece_bytes() overrides it.
# - SPLIT_FROM: smaller messages are one Allreduce (two calls cost more than they save: at
#   64 KiB 1.0x, at 128 KiB 0.76x in place, 1.0x out of place).
DEFAULT_PIECE_BYTES = 512 << 10
SPLIT_FROM = 128 << 10
MAX_COUNT = 1 << 30  # elements per MPI call: under 2^31 for MPIs without MPI-4 large counts
_piece = _env.get("MPIDP_PIECE_BYTES") or DEFAULT_PIECE_BYTES


def piece_bytes():
    """Bytes of its part that each rank reduces per piece of a large allreduce."""
    return _piece


def set_piece_bytes(nbytes):
    """Set the per-rank piece size of large allreduces (0 restores the default)."""
    global _piece
    _piece = int(nbytes) or DEFAULT_PIECE_BYTES


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
    """Allreduce 1-D ``recv`` (from ``send``, or in place when send is None) over ``comm``.

    From SPLIT_FROM bytes on (and with more than one rank) it goes in pieces, each a
    reduce-scatter and an allgather; the last ``size % ranks`` elements, which do not split
    evenly, are one small Allreduce.
    """
    n, ranks = recv.size, comm.Get_size()
    datatype = mpi_type(recv.dtype)
    body = n - n % ranks if ranks > 1 and n * recv.itemsize >= SPLIT_FROM else 0
    if body:
        _split_allreduce(comm, send, recv[:body], datatype, mpi_op)
    for i in range(body, n, MAX_COUNT):  # the rest, or all of a small message
        part = slice(i, min(i + MAX_COUNT, n))
        source = MPI.IN_PLACE if send is None else [send[part], datatype]
        comm.Allreduce(source, [recv[part], datatype], op=mpi_op)


def _split_allreduce(comm, send, recv, datatype, mpi_op):
    ranks, me = comm.Get_size(), comm.Get_rank()
    share = max(1, min(_piece // recv.itemsize, MAX_COUNT // ranks))  # elements per rank per piece
    step = share * ranks
    scratch, raw = None, None
    if send is None:  # MPI forbids the sum landing in the buffer it is read from: use a scratch part
        share = min(share, recv.size // ranks)
        if is_cupy(recv):  # CUDA-aware MPI: the scratch part lives on the device too
            scratch = get_array_module(recv).empty(share, recv.dtype)
        else:
            raw = pool.acquire(share * recv.itemsize)
            scratch = raw[:share * recv.itemsize].view(recv.dtype)
    try:
        for i in range(0, recv.size, step):
            piece = recv[i:i + step]
            c = piece.size // ranks
            mine = piece[me * c:(me + 1) * c]
            if send is None:
                comm.Reduce_scatter_block([piece, datatype], [scratch[:c], datatype], op=mpi_op)
                mine[...] = scratch[:c]
                sync_before_mpi(mine)
            else:
                comm.Reduce_scatter_block([send[i:i + piece.size], datatype], [mine, datatype], op=mpi_op)
            comm.Allgather(MPI.IN_PLACE, [piece, datatype])
    finally:
        if raw is not None:
            pool.release(raw)


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
