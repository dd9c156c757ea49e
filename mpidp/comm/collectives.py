"""Collectives on NumPy and CuPy arrays, with Horovod's names and semantics.

Each collective has one private core that validates its input (before any
communication), stages device data, and returns a Handle from the engine;
the public blocking, in-place and ``_async`` names are one-line wrappers.
"""
import math

import numpy

from .. import _env
from ..backend.xp import asnumpy, get_array_module, is_float_dtype
from . import _hierarchical, check, runtime, stall
from ._buffers import (Staged, allreduce_pieces, bcast_pieces, empty_result, flat, reduce_scatter_pieces, scale,
                       spec, uses_ring)
from .engine import Handle, engine
from .ops import Average, Sum, as_op, check_dtype, dtype_name, mpi_op
from .process_set import resolve

_check_enabled = _env.get("MPIDP_CHECK")


def set_check(enabled):
    """Turn the cross-rank mismatch check on or off (every rank alike); returns the old setting."""
    global _check_enabled
    old, _check_enabled = _check_enabled, bool(enabled)
    return old


def _agree(comm, collective, name, signature):
    if _check_enabled:
        check.agree(comm, collective, name, signature)


def _array(x, name, what):
    """Validate ``x`` locally: an ndarray of a dtype MPI can carry."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        if isinstance(x, (list, tuple, int, float)):
            x = numpy.asarray(x)
        else:
            raise TypeError(f"{what} of tensor {name!r} needs a NumPy or CuPy array, not {type(x).__name__}")
    check_dtype(x.dtype, f"{what} of tensor {name!r}")
    return x


def _launch(blocking, run, name, seq, finish, wake=True):
    if blocking:
        return engine.run(run, name, seq, finish)
    return engine.submit(run, name, seq, finish, wake)


def _copy(xp, x):
    """A C-contiguous copy of ``x`` (in a recycled buffer when big)."""
    out = empty_result(xp, x.shape, x.dtype)
    out[...] = x
    return out


def _path(buf, comm, op, hierarchical=True):
    """How ``buf`` will be reduced. It is part of the checked signature: ranks that would take
    different paths (host memory on one, device memory under a CUDA-aware MPI on another)
    raise MismatchError instead of waiting for each other in different calls."""
    topo = runtime.topology(comm)
    if hierarchical and topo is not None and topo.from_bytes is not None:
        if topo.uses(buf):
            return f"hierarchical ({topo.describe()} nodes)"
        if isinstance(buf, numpy.ndarray):  # below the crossover MPI's own allreduce beats a ring across nodes
            return "MPI"
    if uses_ring(flat(buf), comm.Get_size(), op.ufunc):
        return "ring (host memory)"
    return "MPI" if isinstance(buf, numpy.ndarray) else "MPI (device memory)"


# --- allreduce --------------------------------------------------------------------------------

def _reduce(comm, path, send, recv, mop, ufunc, factor):
    """Allreduce 1-D ``recv`` along ``path``; True when ``factor`` is applied."""
    if path.startswith("hierarchical"):
        return _hierarchical.allreduce(runtime.topology(comm), send, recv, mop, ufunc, factor)
    return allreduce_pieces(comm, send, recv, mop, ufunc, factor, ring_allowed=path.startswith("ring"))


def _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking,
                    wake=True):
    op = as_op(op)
    _, comm = resolve(process_set)
    seq = stall.started()
    name = name or f"allreduce.{seq}"
    x = _array(x, name, "allreduce")
    if not is_float_dtype(x.dtype) and (op is Average or prescale_factor != 1 or postscale_factor != 1):
        raise TypeError(f"allreduce of integer tensor {name!r} ({x.dtype}) with op={op} or scaling: "
                        f"an integer average is not exact; use op=mpidp.Sum and divide yourself")
    xp = get_array_module(x)
    post = postscale_factor / comm.Get_size() if op is Average else postscale_factor
    if inplace or prescale_factor != 1.0:  # reduce in place in a contiguous work array
        work = x if (inplace and x.flags.c_contiguous) else _copy(xp, x)
        scale(work, prescale_factor)
        send, recv = None, Staged(work)
    else:
        send = Staged(xp.ascontiguousarray(x))
        recv = Staged(empty_result(xp, x.shape, x.dtype), copy_in=False)
        work = recv.array
    signature = (("op", op.name), ("dtype", dtype_name(x.dtype)), ("shape", x.shape),
                 ("path", _path(recv.host, comm, op)))
    mop = mpi_op(op, x.dtype)

    def run():
        _agree(comm, "allreduce", name, signature)
        return _reduce(comm, signature[-1][1], None if send is None else flat(send.host), flat(recv.host), mop,
                       op.ufunc, post)

    def finish(scaled):
        if send is not None:
            send.finish(copy_out=False)
        recv.finish()
        if not scaled:
            scale(work, post)
        if inplace and work is not x:
            x[...] = work
            return x
        return work

    return _launch(blocking, run, name, seq, finish, wake)


def fused_allreduce_async_(x, name, process_set=None, wake=True, postscale_factor=1.0):
    """Start summing ``x`` (a fusion buffer) in place over the ranks, times ``postscale_factor``
    (folded into the ring where it applies: an average costs no extra pass).

    ``wake=False`` leaves the engine thread asleep: the caller waits for the result at
    once and so runs the exchange in its own thread. The mismatch check stays on: it
    is what turns a rank that skipped a collective into a MismatchError (about 4 us).
    """
    return _allreduce_core(x, Sum, name, 1.0, postscale_factor, process_set, True, False, wake)


def allreduce(x, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """A new array: ``x`` reduced over the ranks (Average by default)."""
    return _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, False, True)


def allreduce_(x, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    """Reduce ``x`` over the ranks in place; returns ``x``."""
    return _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, True, True)


def allreduce_async(x, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=None):
    """Start allreduce; ``synchronize(handle)`` returns the new array."""
    return _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, False, False)


def allreduce_async_(x, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=None):
    """Start an in-place allreduce of ``x``."""
    return _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, True, False)


# --- grouped allreduce: many tensors, one exchange per dtype ------------------------------------

def _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking):
    op = as_op(op)
    _, comm = resolve(process_set)
    seq = stall.started()
    name = name or f"grouped_allreduce.{seq}"
    tensors = [_array(t, f"{name}[{i}]", "grouped_allreduce") for i, t in enumerate(tensors)]
    if not tensors:
        return _launch(blocking, lambda: None, name, seq, lambda _: [])
    for i, t in enumerate(tensors):
        if not is_float_dtype(t.dtype) and (op is Average or prescale_factor != 1 or postscale_factor != 1):
            raise TypeError(f"grouped_allreduce of integer tensor {name}[{i}] ({t.dtype}) with op={op} "
                            f"or scaling is not exact; use op=mpidp.Sum")
    xp = get_array_module(*tensors)
    groups = {}  # dtype -> indices, in order of first appearance
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    buffers = []
    for dtype, idx in groups.items():
        total = sum(tensors[i].size for i in idx)
        fused = Staged(empty_result(xp, (total,), dtype), copy_in=False)
        offset = 0
        for i in idx:  # pack straight into the buffer MPI will read
            t = tensors[i]
            view = fused.host[offset:offset + t.size].reshape(t.shape)
            if fused.host is fused.array:
                view[...] = t
            else:
                t.get(out=view) if t.flags.c_contiguous else xp.ascontiguousarray(t).get(out=view)
            offset += t.size
        scale(fused.host, prescale_factor)
        buffers.append((dtype, idx, fused))
    post = postscale_factor / comm.Get_size() if op is Average else postscale_factor
    signature = (("op", op.name), ("tensors", tuple((dtype_name(t.dtype), tuple(t.shape)) for t in tensors)),
                 ("path", tuple(_path(fused.host, comm, op) for _, _, fused in buffers)))

    def run():
        _agree(comm, "grouped_allreduce", name, signature)
        return [_reduce(comm, path, None, fused.host, mpi_op(op, dtype), op.ufunc, post)
                for (dtype, _, fused), path in zip(buffers, signature[-1][1])]

    def finish(scaled):
        out = [None] * len(tensors)
        for (dtype, idx, fused), done in zip(buffers, scaled):
            result = fused.finish()
            if not done:
                scale(result, post)
            offset = 0
            for i in idx:
                t = tensors[i]
                view = result[offset:offset + t.size].reshape(t.shape)
                if inplace:
                    t[...] = view
                    out[i] = t
                else:
                    out[i] = view
                offset += t.size
        return out

    return _launch(blocking, run, name, seq, finish)


def grouped_allreduce(tensors, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                      process_set=None):
    """New arrays: each tensor reduced, all in one fused exchange per dtype."""
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, False, True)


def grouped_allreduce_(tensors, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=None):
    """Reduce each tensor in place, in one fused exchange per dtype."""
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, True, True)


def grouped_allreduce_async(tensors, op=Average, name=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None):
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, False, False)


# --- allgather ----------------------------------------------------------------------------------

def _allgather_core(x, name, process_set, blocking):
    _, comm = resolve(process_set)
    seq = stall.started()
    name = name or f"allgather.{seq}"
    x = _array(x, name, "allgather")
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x.reshape(1) if x.ndim == 0 else x)
    rows, tail = x.shape[0], tuple(x.shape[1:])
    row = math.prod(tail)
    signature = (("dtype", dtype_name(x.dtype)), ("shape[1:]", tail))
    fp = check.fingerprint(signature)
    send = Staged(x)

    def run():
        n = comm.Get_size()
        meta = numpy.array([rows, fp], dtype=numpy.int64)
        table = numpy.empty((n, 2), dtype=numpy.int64)
        comm.Allgather(meta, table)  # row counts, and the check for free
        if (table[:, 1] != fp).any():
            raise check.mismatch_error("allgather", comm.allgather((name, signature)), comm)
        counts = table[:, 0] * row
        displs = numpy.concatenate(([0], numpy.cumsum(counts)[:-1]))
        out = empty_result(numpy, (int(table[:, 0].sum()),) + tail, x.dtype)
        comm.Allgatherv(spec(flat(send.host)), spec(flat(out), counts, displs))
        return out

    def finish(out):
        send.finish(copy_out=False)
        return out if xp is numpy else xp.asarray(out)

    return _launch(blocking, run, name, seq, finish)


def allgather(x, name=None, process_set=None):
    """Concatenation of every rank's ``x`` along axis 0 (first dimensions may differ; 0-d gives (size,))."""
    return _allgather_core(x, name, process_set, True)


def allgather_async(x, name=None, process_set=None):
    return _allgather_core(x, name, process_set, False)


# --- broadcast ----------------------------------------------------------------------------------

def _broadcast_core(x, root_rank, name, process_set, inplace, blocking):
    ps, comm = resolve(process_set)
    root = ps.to_local(int(root_rank))
    seq = stall.started()
    name = name or f"broadcast.{seq}"
    x = _array(x, name, "broadcast")
    xp = get_array_module(x)
    work = x if (inplace and x.flags.c_contiguous) else _copy(xp, x)
    buf = Staged(work, copy_in=comm.Get_rank() == root)
    signature = (("root_rank", int(root_rank)), ("dtype", dtype_name(x.dtype)), ("shape", tuple(x.shape)))

    def run():
        _agree(comm, "broadcast", name, signature)
        bcast_pieces(comm, flat(buf.host), root)

    def finish(_):
        buf.finish()
        if inplace and work is not x:
            x[...] = work
            return x
        return work

    return _launch(blocking, run, name, seq, finish)


def broadcast(x, root_rank, name=None, process_set=None):
    """A new array holding ``root_rank``'s ``x`` (every rank passes the same shape and dtype)."""
    return _broadcast_core(x, root_rank, name, process_set, False, True)


def broadcast_(x, root_rank, name=None, process_set=None):
    """Overwrite ``x`` with ``root_rank``'s ``x``; returns ``x``."""
    return _broadcast_core(x, root_rank, name, process_set, True, True)


def broadcast_async(x, root_rank, name=None, process_set=None):
    return _broadcast_core(x, root_rank, name, process_set, False, False)


def broadcast_async_(x, root_rank, name=None, process_set=None):
    return _broadcast_core(x, root_rank, name, process_set, True, False)


# --- alltoall -----------------------------------------------------------------------------------

def _alltoall_core(x, splits, name, process_set, blocking):
    _, comm = resolve(process_set)
    n = comm.Get_size()
    seq = stall.started()
    name = name or f"alltoall.{seq}"
    x = _array(x, name, "alltoall")
    if x.ndim == 0:
        raise ValueError(f"alltoall of tensor {name!r} needs at least one dimension to split, got a 0-d array")
    rows, tail = x.shape[0], tuple(x.shape[1:])
    if splits is None:
        if rows % n:
            raise ValueError(f"alltoall of tensor {name!r}: first dimension {rows} does not divide "
                             f"by {n} ranks; pass splits= with one row count per rank")
        splits = numpy.full(n, rows // n, dtype=numpy.int64)
    else:
        splits = numpy.asarray(asnumpy(splits), dtype=numpy.int64).reshape(-1)
        if splits.size != n or (splits < 0).any() or splits.sum() != rows:
            raise ValueError(f"alltoall of tensor {name!r}: splits {splits.tolist()} must have {n} "
                             f"non-negative entries summing to the first dimension {rows}")
    xp = get_array_module(x)
    row = math.prod(tail)
    send = Staged(xp.ascontiguousarray(x))
    signature = (("dtype", dtype_name(x.dtype)), ("shape[1:]", tail))

    def run():
        _agree(comm, "alltoall", name, signature)
        received = numpy.empty(n, dtype=numpy.int64)
        comm.Alltoall(splits, received)
        out = empty_result(numpy, (int(received.sum()),) + tail, x.dtype)
        sc, rc = splits * row, received * row
        sd = numpy.concatenate(([0], numpy.cumsum(sc)[:-1]))
        rd = numpy.concatenate(([0], numpy.cumsum(rc)[:-1]))
        comm.Alltoallv(spec(flat(send.host), sc, sd), spec(flat(out), rc, rd))
        return out, received

    def finish(result):
        send.finish(copy_out=False)
        out, received = result
        return (out if xp is numpy else xp.asarray(out)), received

    return _launch(blocking, run, name, seq, finish)


def alltoall(x, splits=None, name=None, process_set=None):
    """Send ``splits[r]`` rows of ``x`` to rank r; returns (received rows, rows received from each rank)."""
    return _alltoall_core(x, splits, name, process_set, True)


def alltoall_async(x, splits=None, name=None, process_set=None):
    return _alltoall_core(x, splits, name, process_set, False)


# --- reducescatter ------------------------------------------------------------------------------

def _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, blocking):
    op = as_op(op)
    _, comm = resolve(process_set)
    n, me = comm.Get_size(), comm.Get_rank()
    seq = stall.started()
    name = name or f"reducescatter.{seq}"
    x = _array(x, name, "reducescatter")
    if x.ndim == 0:
        raise ValueError(f"reducescatter of tensor {name!r} needs at least one dimension, got a 0-d array")
    if not is_float_dtype(x.dtype) and (op is Average or prescale_factor != 1 or postscale_factor != 1):
        raise TypeError(f"reducescatter of integer tensor {name!r} ({x.dtype}) with op={op} or scaling "
                        f"is not exact; use op=mpidp.Sum")
    xp = get_array_module(x)
    rows, tail = x.shape[0], tuple(x.shape[1:])
    row = math.prod(tail)
    base, extra = divmod(rows, n)
    mine = base + (me < extra)  # the first ``extra`` ranks get one row more
    counts = numpy.array([(base + (r < extra)) * row for r in range(n)], dtype=numpy.int64)
    work = _copy(xp, x) if prescale_factor != 1 else xp.ascontiguousarray(x)
    scale(work, prescale_factor)
    send = Staged(work)
    recv = Staged(empty_result(xp, (mine,) + tail, x.dtype), copy_in=False)
    post = postscale_factor / n if op is Average else postscale_factor
    topo = runtime.topology(comm)
    path = (f"hierarchical ({topo.describe()} nodes)" if topo is not None and topo.even and topo.uses(send.host)
            else _path(send.host, comm, op, hierarchical=False))
    signature = (("op", op.name), ("dtype", dtype_name(x.dtype)), ("shape", tuple(x.shape)), ("path", path))
    mop = mpi_op(op, x.dtype)

    def run():
        _agree(comm, "reducescatter", name, signature)
        if not rows:
            return True
        if path.startswith("hierarchical"):
            return _hierarchical.reduce_scatter(topo, flat(send.host), flat(recv.host), counts, mop, op.ufunc)
        return reduce_scatter_pieces(comm, flat(send.host), flat(recv.host), counts, mop, op.ufunc, post)

    def finish(scaled):
        send.finish(copy_out=False)
        out = recv.finish()
        if not scaled:
            scale(out, post)
        return out

    return _launch(blocking, run, name, seq, finish)


def reducescatter(x, op=Average, name=None, process_set=None, prescale_factor=1.0, postscale_factor=1.0):
    """This rank's rows of ``x`` reduced over the ranks (the first ranks get one row more)."""
    return _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, True)


def reducescatter_async(x, op=Average, name=None, process_set=None, prescale_factor=1.0,
                        postscale_factor=1.0):
    return _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, False)


# --- the rest -----------------------------------------------------------------------------------

def barrier(process_set=None):
    """Wait until every rank (of the set) gets here."""
    _, comm = resolve(process_set)
    seq = stall.started()
    engine.run(comm.Barrier, f"barrier.{seq}", seq)


def synchronize(handle):
    """Wait for an ``*_async`` handle and return its result."""
    if not isinstance(handle, Handle):
        raise TypeError(f"synchronize() takes a handle from an *_async call, not {type(handle).__name__}")
    return handle.wait()


def poll(handle):
    """True when the handle's communication has finished (synchronize() will not block)."""
    return handle.done()


__all__ = ["allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
           "grouped_allreduce_", "grouped_allreduce_async", "allgather", "allgather_async",
           "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "alltoall",
           "alltoall_async", "reducescatter", "reducescatter_async", "barrier", "synchronize",
           "poll", "Handle", "set_check"]
