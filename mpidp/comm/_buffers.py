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
# call measured). Pieces keep it small, reused and in cache. How a piece is reduced differs by
# form (np=2, MPICH, this machine, ratios to one comm.Allreduce of the whole message):
# - out of place (send -> new result): each piece is a Reduce_scatter_block that leaves rank r
#   the sum of part r of the piece, then an in-place Allgather that hands every part to every
#   rank: 0.57x at 1 MiB, 0.41-0.54x at 4 MiB, 0.70x at 16 MiB, 0.32x at 64 MiB, where pieced
#   Allreduce calls gave 0.8x, 0.8x, 1.0x and 0.44x. Each element is reduced on one rank only,
#   so every rank gets bitwise the same result. The piece setting is the part each rank
#   reduces: 512 KiB was best at np=2, 3 and 4. Messages under SPLIT_FROM are one Allreduce:
#   two calls cost more than they save below 128 KiB.
# - in place (allreduce_, gradient buckets): MPI forbids a reduce-scatter into the buffer it
#   reads, and the extra copy through a scratch part made it 1.2x slower than Allreduce calls
#   of 2 MiB on ResNet-50's 102 MB of gradients (data not in cache). So in place stays pieced
#   Allreduce calls; 2 MiB was best on ResNet-50 buckets (bench_gradsync.py --sweep).
# MPIDP_PIECE_BYTES (both forms) or set_piece_bytes() overrides.
DEFAULT_PIECE_BYTES = 512 << 10
DEFAULT_INPLACE_PIECE_BYTES = 2 << 20
SPLIT_FROM = 128 << 10
MAX_COUNT = 1 << 30  # elements per MPI call: under 2^31 for MPIs without MPI-4 large counts
_pieces = {False: _env.get("MPIDP_PIECE_BYTES") or DEFAULT_PIECE_BYTES,
           True: _env.get("MPIDP_PIECE_BYTES") or DEFAULT_INPLACE_PIECE_BYTES}


def piece_bytes(in_place=True):
    """Piece size of a large allreduce: in place, bytes per Allreduce call; out of place,
    the bytes of its part that each rank reduces per piece."""
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
    """Allreduce 1-D ``recv`` (from ``send``, or in place when send is None) over ``comm``.

    Out of place from SPLIT_FROM bytes (and with more than one rank), pieces are a
    reduce-scatter and an allgather, and the last ``size % ranks`` elements, which do not
    split evenly, one small Allreduce. Otherwise pieces are Allreduce calls.
    """
    n, ranks = recv.size, comm.Get_size()
    datatype = mpi_type(recv.dtype)
    split = send is not None and ranks > 1 and n * recv.itemsize >= SPLIT_FROM
    body = n - n % ranks if split else 0
    if body:
        _split_allreduce(comm, send[:body], recv[:body], datatype, mpi_op)
    step = max(1, min(MAX_COUNT, _pieces[True] // recv.itemsize)) if send is None else MAX_COUNT
    for i in range(body, n, step):  # the rest, or all of an in-place or small message
        source = MPI.IN_PLACE if send is None else [send[i:i + step], datatype]
        comm.Allreduce(source, [recv[i:i + step], datatype], op=mpi_op)


def _split_allreduce(comm, send, recv, datatype, mpi_op):
    ranks, me = comm.Get_size(), comm.Get_rank()
    share = max(1, min(_pieces[False] // recv.itemsize, MAX_COUNT // ranks))  # elements per rank
    step = share * ranks
    for i in range(0, recv.size, step):
        piece = recv[i:i + step]
        c = piece.size // ranks
        comm.Reduce_scatter_block([send[i:i + piece.size], datatype], [piece[me * c:(me + 1) * c], datatype],
                                  op=mpi_op)
        comm.Allgather(MPI.IN_PLACE, [piece, datatype])


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
