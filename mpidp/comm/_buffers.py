"""Arrays as MPI-ready contiguous host (or CUDA-aware device) buffers, and pieced transfers."""
import itertools
import math
import weakref

import numpy
from mpi4py import MPI

from .. import _env
from ..backend.device import sync_before_mpi
from ..backend.pinned import pool, staged
from ..backend.xp import get_array_module, is_cupy, is_float_dtype
from . import runtime, stall
from .ops import HALF, mpi_type

# Large host reductions go around a ring, in pieces: each rank sends a part of the piece to
# its right neighbour and reduces the part arriving from its left with NumPy (ranks - 1
# Sendrecv steps), so every part ends up fully reduced on one rank, then ranks - 1 more
# steps pass the reduced parts on (a reduce-scatter then an allgather, the schedule of
# Horovod's and Baidu's ring allreduce). Every element is reduced by one rank only, so every
# rank gets bitwise the same result. Measured against MPICH's own collectives (np=2, this
# machine, ratio to one comm.Allreduce of the message): out of place 0.53 at 1 MiB, 0.64 at
# 4 MiB, 0.59 at 16 MiB, 0.47 at 64 MiB, where MPICH's Reduce_scatter_block + Allgather gave
# 0.9, 0.9, 0.85, 0.7 (its reduce-scatter copies the input first and reduces slowly); in place
# 0.67-0.85 of 2 MiB Allreduce calls, and 0.6-0.9 on 100 MB of gradients out of cache. At np=3
# and 4 (oversubscribed) it was 0.3-0.9 of MPICH. The piece is the part one rank reduces per
# step: 2 MiB was best or equal at np=2, 3 and 4.
# Below RING_FROM bytes per rank (where the ring's 2 (ranks - 1) steps cost more than they
# save), for device memory under a CUDA-aware MPI, and for dtypes or ops NumPy does not
# reduce like MPI (bool), a message is MPI Allreduce calls: in place in pieces of the same
# size (MPICH mallocs a message-sized temporary on every call, and from 32 MiB glibc maps and
# unmaps it each time: 8,194 page faults per 64 MiB call), out of place in one call.
# MPIDP_PIECE_BYTES or set_piece_bytes() overrides the piece.
DEFAULT_PIECE_BYTES = 2 << 20
RING_FROM = 128 << 10
MAX_COUNT = 1 << 30  # elements per MPI call: under 2^31 for MPIs without MPI-4 large counts
# A ring's messages carry a tag from its collective's number on the communicator: messages of
# different collectives never match, even when a ring was abandoned half-way on some rank.
# mpidp's communicators are its own, so no user message can match either. MPI guarantees
# tags up to 32767.
TAG_SPACE = 32767
_piece = _env.get("MPIDP_PIECE_BYTES") or DEFAULT_PIECE_BYTES


def piece_bytes():
    """Piece size of a large allreduce: the bytes one rank reduces per ring step, or
    the bytes of one in-place Allreduce call where the ring does not apply."""
    return _piece


def set_piece_bytes(nbytes):
    """Set the piece size in bytes (0 restores the default)."""
    global _piece
    _piece = int(nbytes) or DEFAULT_PIECE_BYTES


def ring_tag(seq):
    """The tag of collective number ``seq``'s ring messages."""
    return seq % TAG_SPACE


def uses_ring(recv, ranks, ufunc):
    """Whether an allreduce into ``recv`` goes around the ring (else MPI Allreduce calls)."""
    return (ufunc is not None and ranks > 1 and isinstance(recv, numpy.ndarray)
            and (recv.dtype.kind in "fiu" or recv.dtype in HALF)
            and recv.size // ranks * recv.itemsize >= RING_FROM)


def scale(x, factor):
    """``x *= factor`` in place, in x's own precision (a Python float factor costs NumPy 1.4x the pass)."""
    if factor != 1.0:
        typed = x.dtype.type(factor) if is_float_dtype(x.dtype) else factor
        get_array_module(x).multiply(x, typed, out=x, casting="unsafe")


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


def allreduce_pieces(comm, send, recv, mpi_op, ufunc=None, factor=1.0, seq=0, ring_allowed=True):
    """Allreduce 1-D ``recv`` (from ``send``, or in place when send is None) over ``comm``.

    Where ``uses_ring`` (``ufunc`` is the op's NumPy ufunc), the first ``size - size % ranks``
    elements go around the ring and the rest, which does not split over the ranks, is one
    small Allreduce; the ring also multiplies by ``factor`` each part it completes, while the
    part is in cache (an average costs no extra pass). Otherwise the message is Allreduce
    calls (always with ``ring_allowed=False``). Returns True when ``recv`` holds the scaled
    result, False when the caller must still multiply by ``factor``. ``seq`` (the collective's number) tags the ring's messages.
    NumPy's reductions here ignore the caller's ``numpy.seterr`` and warning filters: an
    overflow gives inf on every rank, as MPI's own sum does, never an error on the one
    rank that reduced that part.
    """
    n, ranks = recv.size, comm.Get_size()
    datatype = mpi_type(recv.dtype)
    body = n - n % ranks if ring_allowed and uses_ring(recv, ranks, ufunc) else 0
    if not body and recv.dtype not in HALF:  # MPI's own reduction: no NumPy involved
        step = max(1, min(MAX_COUNT, _piece // recv.itemsize)) if send is None else MAX_COUNT
        for i in range(0, n, step):
            source = MPI.IN_PLACE if send is None else [send[i:i + step], datatype]
            comm.Allreduce(source, [recv[i:i + step], datatype], op=mpi_op)
        return factor == 1.0
    with numpy.errstate(all="ignore"):
        if body:
            source = recv if send is None else send
            ring(comm, source[:body], [body // ranks] * ranks, datatype, ufunc, factor, whole=recv[:body],
                 tag=ring_tag(seq))
        step = max(1, min(MAX_COUNT, _piece // recv.itemsize)) if send is None else MAX_COUNT
        for i in range(body, n, step):  # 16-bit floats: NumPy reduces them inside MPI's call
            source = MPI.IN_PLACE if send is None else [send[i:i + step], datatype]
            comm.Allreduce(source, [recv[i:i + step], datatype], op=mpi_op)
            stall.tick()  # a piece done: slow, not stalled
        if body:
            scale(recv[body:], factor)
    return bool(body) or factor == 1.0


def reduce_scatter_pieces(comm, send, recv, counts, mpi_op, ufunc=None, factor=1.0, seq=0):
    """Reduce-scatter 1-D ``send`` (rank k's part: ``counts[k]`` elements) into ``recv``: around
    the ring where ``uses_ring``, scaled on the way (returns True), else one MPI Reduce_scatter
    (returns whether ``factor`` is 1, i.e. nothing is left for the caller to do). NumPy's
    reductions ignore the caller's error state, as in ``allreduce_pieces``."""
    if uses_ring(send, comm.Get_size(), ufunc):
        with numpy.errstate(all="ignore"):
            ring(comm, send, [int(c) for c in counts], mpi_type(send.dtype), ufunc, factor, mine=recv,
                 tag=ring_tag(seq))
        return True
    if send.dtype in HALF:  # NumPy reduces 16-bit floats inside MPI's call
        with numpy.errstate(all="ignore"):
            comm.Reduce_scatter(spec(send), spec(recv), recvcounts=counts, op=mpi_op)
    else:
        comm.Reduce_scatter(spec(send), spec(recv), recvcounts=counts, op=mpi_op)
    return factor == 1.0


def ring(comm, x, counts, datatype, ufunc, factor=1.0, whole=None, mine=None, tag=0):
    """Reduce 1-D ``x`` over ``comm`` around the ring, in pieces, times ``factor``.

    ``x`` is every rank's part in rank order (``counts[k]`` elements for rank k). Rank k's
    part ends reduced in ``mine`` (a reduce-scatter), or, with ``whole`` (x's shape; x may be
    whole), every part ends in ``whole`` on every rank (an allreduce). Per piece, ranks - 1
    Sendrecv steps pass a partial sum on to the right neighbour, which adds its own data with
    ``ufunc``; part k is complete on rank k, scaled there, and (allreduce) ranks - 1 more
    steps pass the complete parts on. Every message carries ``tag``.
    """
    ranks, me = comm.Get_size(), comm.Get_rank()
    left, right = (me - 1) % ranks, (me + 1) % ranks
    starts = list(itertools.accumulate(counts, initial=0))
    share = max(1, min(_piece // x.itemsize, MAX_COUNT, max(counts)))  # elements per part and piece
    raw = pool.acquire(share * x.itemsize * (1 if whole is not None else 2))
    got = raw[:share * x.itemsize].view(x.dtype)
    acc = raw[share * x.itemsize:2 * share * x.itemsize].view(x.dtype)  # reduce-scatter's partial sums
    try:
        for lo in range(0, max(counts), share):
            if lo:
                stall.tick()  # a piece done: slow, not stalled
            part = [slice(starts[k] + min(lo, counts[k]), starts[k] + min(lo + share, counts[k]))
                    for k in range(ranks)]
            size = [p.stop - p.start for p in part]
            done = whole[part[me]] if whole is not None else mine[min(lo, counts[me]):min(lo + share, counts[me])]

            def partial(k):  # where a partial sum of part k waits until it is sent on
                return whole[part[k]] if whole is not None else acc[:size[k]]

            for step in range(ranks - 1):
                out, into = (me - step - 1) % ranks, (me - step - 2) % ranks
                arrived = got[:size[into]]
                comm.Sendrecv([x[part[out]] if step == 0 else partial(out), datatype], right, tag,
                              [arrived, datatype], left, tag)
                ufunc(arrived, x[part[into]], out=done if step == ranks - 2 else partial(into))
            scale(done, factor)
            for step in range(ranks - 1 if whole is not None else 0):  # allgather the complete parts
                comm.Sendrecv([whole[part[(me - step) % ranks]], datatype], right, tag,
                              [whole[part[(me - step - 1) % ranks]], datatype], left, tag)
    finally:
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
    count = math.prod(shape)
    if xp is not numpy or count * dtype.itemsize < RECYCLE_BYTES:
        return xp.empty(shape, dtype=dtype)
    raw = pool.acquire(count * dtype.itemsize)
    flat_result = numpy.frombuffer(memoryview(raw), dtype=dtype, count=count)
    # NumPy keeps its own memoryview as the base; every view of the result keeps it alive
    weakref.finalize(flat_result.base, pool.release, raw)
    return flat_result.reshape(shape)
