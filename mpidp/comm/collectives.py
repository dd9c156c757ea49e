"""Collectives on NumPy and CuPy arrays, with Horovod's names and semantics.

Each collective has one private core that validates its input (everything that
can fail locally fails here, before any communication), stages device data,
and hands its communicator's engine a job: the cross-rank check of its
signature, then the transfer. The public blocking, in-place and ``_async``
names are one-line wrappers.

Once the ranks have agreed to run a collective, an exception on one rank would
leave the others waiting inside MPI for ever: it ends the whole job at once,
with its traceback (``_fatal``).
"""
import functools
import itertools
import math
import numbers
import operator

import numpy
from mpi4py import MPI

from .. import timeline
from ..backend.interop import is_foreign
from ..backend.xp import asnumpy, get_array_module
from ..errors import MpidpError
from . import _buffers, _fatal, _hierarchical, check, dlpack as _dlpack, engine as _engine, runtime
from . import process_set as _process_set  # (the collectives' argument process_set shadows the name)
from ._buffers import (MAX_COUNT, Staged, allreduce_pieces, bcast_pieces, empty_result, flat, reduce_scatter_pieces,
                       scale, spec, uses_ring)
from .engine import Handle, engine_for
from .join import average_factor
from .ops import HALF, Average, Sum, as_op, check_dtype, check_reduction, dtype_name, mpi_op, mpi_type
from .process_set import resolve

def set_check(enabled):
    """Turn the cross-rank mismatch check on or off, on every rank: a collective (each rank calls it,
    with the same value, or all raise MismatchError); returns the old setting."""
    if runtime.is_initialized():  # a rank without the check would meet the others' in another call: a hang
        # on each process set too, behind its queue: a job reads the setting when it runs, so one started
        # before must have run on every rank before the switch (a set's engine may be late on one rank)
        for comm in [runtime.get_comm()] + [ps.comm for ps in _process_set._created if ps.comm is not None]:
            check.agree(comm, "set_check", "set_check", (("enabled", bool(enabled)),),
                        "call set_check() on every rank, with the same value")
    return check.set_enabled(enabled)


def _begin(process_set, kind, name):
    """(set, communicator, its engine, this collective's number, display name) for a new collective.

    The number is only reserved here: ``_launch`` takes it once the local checks have passed.
    """
    ps, comm = resolve(process_set)
    eng = engine_for(comm)
    seq = eng.peek()
    return ps, comm, eng, seq, name or f"{kind}.{seq}"


def _take(eng, seq, name):
    """Take the collective number ``_begin`` reserved (the local checks passed)."""
    if eng.started() != seq:
        raise MpidpError(f"collective {name!r} and another one were started at the same time from two "
                         f"threads on {eng.progress.label}: their order could differ between ranks; "
                         f"start collectives on one communicator from one thread, or order them yourself")


def _signature(eng, kind, name, *fields):
    """The checked fields: kind, process set and the caller's name (auto-names are kind.seq, and
    the sequence number is checked with every signature), then the collective's own fields."""
    return (("collective", kind), ("process set", eng.progress.label), ("name", name)) + fields


def _job(comm, kind, name, signature, seq, body, carry=None, carried=None, known=None):
    """The engine's job: agree on ``signature`` (MismatchError on every rank), then ``body(joined)``,
    ``joined`` the ranks that take part with nothing to contribute (``mpidp.join``).

    ``carry``, a small host payload (``check.carrying``), travels in the check's own message;
    where it did (the check on, nobody joined) ``carried()`` finishes the collective from what
    every rank carried, instead of ``body``. ``known`` is the signature's fingerprint, if kept.
    """
    def run():
        if check._enabled:
            joined = check.compare(comm, kind, name, signature, seq, known=known, carry=carry)
            arrived = carry is not None and not joined
        else:
            joined, arrived = (), False
        try:
            return carried() if arrived else body(joined)
        except BaseException as exc:
            _fatal.after_agreement(comm, f"{kind} of tensor {name!r}", exc)
    return run


def _arguments(what, name, prescale_factor, postscale_factor):
    """Refuse a name or a factor of the wrong type (before any communication)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{what}: name must be a str or None, not {type(name).__name__} {name!r}")
    for field, factor in (("prescale_factor", prescale_factor), ("postscale_factor", postscale_factor)):
        if not isinstance(factor, numbers.Real):
            raise TypeError(f"{what} of tensor {name!r}: {field} must be a real number, not "
                            f"{type(factor).__name__} {factor!r}")


def _writable(x, name, what):
    if not getattr(x.flags, "writeable", True):
        raise ValueError(f"{what} of tensor {name!r} writes its result into the array, which is "
                         f"read-only; pass a writable array or use the out-of-place call")


def _release(*staged):
    """Give staging buffers back (a collective that raised); None when nothing is staged."""
    if all(s is None or s.host is s.array for s in staged):
        return None

    def release():
        for s in staged:
            if s is not None:
                s.finish(copy_out=False)
    return release


def _array(x, name, what):
    """Validate ``x`` locally: an ndarray of a dtype MPI can carry."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        if isinstance(x, (list, tuple, int, float)):
            x = numpy.asarray(x)
        else:
            raise TypeError(f"{what} of tensor {name!r} needs a NumPy or CuPy array, not {type(x).__name__}")
    check_dtype(x.dtype, f"{what} of tensor {name!r}")
    return x


def _launch(eng, blocking, run, name, seq, finish, release=None, wake=True):
    try:
        _take(eng, seq, name)
    except MpidpError:
        if release is not None:
            release()
        raise
    if blocking:
        return eng.run(run, name, seq, finish, release)
    return eng.submit(run, name, seq, finish, wake, release)


def _copy(xp, x):
    """A C-contiguous copy of ``x`` (in a recycled buffer when big)."""
    out = empty_result(xp, x.shape, x.dtype)
    out[...] = x
    return out


def _path(buf, comm, op, inplace=False, hierarchical=True):
    """How ``buf`` will be reduced. It is part of the checked signature: ranks that would take
    different paths (host memory on one, device memory under a CUDA-aware MPI on another, or
    one MPI call out of place against pieces in place, or the hierarchical path on a rank whose
    crossover differs) raise MismatchError instead of waiting for each other in different calls."""
    topo = runtime.topology(comm)
    if hierarchical and topo is not None and topo.from_bytes is not None:
        if topo.uses(buf):
            return f"hierarchical ({topo.describe()} nodes)"
        if isinstance(buf, numpy.ndarray):  # below the crossover MPI's own allreduce beats a ring across nodes
            return "MPI, in place" if inplace else "MPI"
    if uses_ring(flat(buf), comm.Get_size(), op.ufunc):
        return "ring (host memory)"
    where = "MPI" if isinstance(buf, numpy.ndarray) else "MPI (device memory)"
    return where + ", in place" if inplace else where


# --- allreduce --------------------------------------------------------------------------------
# A repeated small allreduce (a loss, a metric, an overflow flag) is a few microseconds of MPI, and
# the Python around it used to cost several times that. The work that depends only on the call's
# signature (validation, the checked fields and their fingerprint, the MPI op and datatype, the
# scale) is done once, by the general core, and kept on the communicator's engine; a call
# of a host array with a known signature that is one MPI call then takes the short path below. The
# check still runs on every call, over the same fields: ranks on the two paths agree or disagree
# exactly as two ranks on the general path would. Nonblocking calls take it too (queued as usual).

def _engine_of(process_set):
    """The engine of ``process_set``'s communicator for a short path (the main one without a lookup)."""
    eng = _engine.engine
    if process_set is not None or eng.comm is None or eng.comm is not runtime._state.comm:
        eng = engine_for(resolve(process_set)[1])
    return eng


def _keep(eng, key, plan):
    """Keep ``plan`` for the calls like this one (at most about a thousand per communicator)."""
    if len(eng.plans) > 1024:
        eng.plans.clear()
    eng.plans[key] = plan


def _plan_key(comm, x, op, name, prescale_factor, postscale_factor, inplace):
    """What a plan depends on: the call's fields, the piece size and the ring's threshold, and the
    topology and its hierarchical crossover (``tune.hierarchical()`` moves it: a plan made before
    must not keep the old path)."""
    topo = runtime._state.topology if comm is runtime._state.comm else runtime.topology(comm)
    return (x.dtype, x.shape, op, name, prescale_factor, postscale_factor, inplace, _buffers._piece,
            _buffers.RING_FROM, topo, None if topo is None else topo.from_bytes)


def _allreduce_planned(eng, plan, x, out, inplace, what, seq):
    """Run an allreduce through its plan as a job of ``eng``: the factor its result is to be scaled by."""
    signature, fingerprint, datatype, mop, _, carrier, post, average = plan
    comm, joined, carried = eng.comm, (), False
    if check._enabled:
        if carrier is not None:
            carrier.mine[...] = x
        if check.meet(eng, check.stamp(fingerprint, seq)):
            carried = carrier is not None
        else:  # a joined rank carries nothing: then the reduction is an MPI call
            joined = check.differ(comm, "allreduce", what, signature, seq)
    try:
        if carried:
            carrier.reduce(out, mop, datatype)
        else:
            comm.Allreduce(MPI.IN_PLACE if inplace else [x, datatype], [out, datatype], op=mop)
    except BaseException as exc:
        _fatal.after_agreement(comm, f"allreduce of tensor {what!r}", exc)
    # an average over the ranks that contributed when some have joined (mpidp.join)
    return average_factor(average, comm.Get_size(), joined) if joined and average is not None else post


def _scaled(out, factor):
    if factor != 1.0:
        scale(out, factor)
    return out


def _carries(comm, path, dtype, nbytes):
    """Whether an allreduce's payload travels in its check's own message: a host message on the
    plain MPI path small enough for the check's row (a function of checked fields and the
    communicator's size only, so equal on ranks that agree)."""
    return path in ("MPI", "MPI, in place") and dtype not in HALF and 0 < nbytes <= check.carrying(comm)


_NOTHING = numpy.empty(0, dtype=numpy.uint8)  # what a rank carries that has nothing to give


def _on_host(buf):
    """``buf``'s bytes in host memory for the check to carry (a copy of a small device array)."""
    return buf if isinstance(buf, numpy.ndarray) else asnumpy(buf)


def _keep_plan(eng, key, signature, x, op, prescale_factor, postscale_factor, inplace, mop, post, path):
    """Cache the plan of a host allreduce that is one MPI call (see ``allreduce_pieces``): on the
    plain MPI path only, so a rank on the short path always does what a rank on the general one does."""
    count = max(1, min(MAX_COUNT, _buffers._piece // x.itemsize)) if inplace else MAX_COUNT
    # (not an empty array: the general path makes no MPI call for it after the check, the plan one)
    if (prescale_factor != 1.0 or x.dtype in HALF or not 0 < x.size <= count or path not in ("MPI", "MPI, in place")
            or uses_ring(flat(x), eng.comm.Get_size(), op.ufunc)):
        return
    carrier = check.Carrier(eng, x.dtype, x.shape) if _carries(eng.comm, path, x.dtype, x.nbytes) else None
    _keep(eng, key, (signature, check.fingerprint(signature), mpi_type(x.dtype), mop,
                      x.nbytes >= _buffers.RECYCLE_BYTES, carrier, post, postscale_factor if op is Average else None))


def _reduce(comm, path, send, recv, mop, ufunc, factor, seq):
    """Allreduce 1-D ``recv`` along ``path``; True when ``factor`` is applied."""
    if path.startswith("hierarchical"):
        return _hierarchical.allreduce(runtime.topology(comm), send, recv, mop, ufunc, factor)
    return allreduce_pieces(comm, send, recv, mop, ufunc, factor, seq, ring_allowed=path.startswith("ring"))


_ALLREDUCE_NAMES = {(False, True): "allreduce", (True, True): "allreduce_", (False, False): "allreduce_async",
                    (True, False): "allreduce_async_"}


def _allreduce_core(x, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking,
                    wake=True):
    if type(x) is not numpy.ndarray:
        if is_foreign(x):  # (here, not in a wrapper: a small allreduce's budget is a few microseconds)
            return _dlpack.call(_allreduce_core, x, inplace, _ALLREDUCE_NAMES[inplace, blocking], op, name,
                                prescale_factor, postscale_factor, process_set, inplace, blocking, wake)
        return _allreduce_general(x, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking,
                                  wake)
    # a host array: through its cached plan, if the general path below kept one
    if type(prescale_factor) is not float or type(postscale_factor) is not float:  # (a Decimal equals a float key)
        _arguments("allreduce", name, prescale_factor, postscale_factor)
    eng = _engine_of(process_set)
    comm = eng.comm
    try:
        plan = eng.plans.get(_plan_key(comm, x, op, name, prescale_factor, postscale_factor, inplace))
    except TypeError:  # an unhashable argument: the general path says what is wrong with it
        plan = None
    flags = x.flags
    if plan is None or not flags.c_contiguous or (inplace and not flags.writeable):
        return _allreduce_general(x, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking,
                                  wake)
    seq = eng.started()
    what = name or f"allreduce.{seq}"
    out = x if inplace else (empty_result(numpy, x.shape, x.dtype) if plan[4] else numpy.empty(x.shape, x.dtype))
    if blocking and not timeline.enabled():  # run it right here when the engine is free: no closures
        outer = eng.claim(what, seq)
        if outer is not _engine._BUSY:
            try:
                factor = _allreduce_planned(eng, plan, x, out, inplace, what, seq)
            finally:
                eng.unclaim(outer)
            return _scaled(out, factor)
    run = functools.partial(_allreduce_planned, eng, plan, x, out, inplace, what, seq)
    if not blocking:
        return eng.submit(run, what, seq, functools.partial(_scaled, out), wake)
    return _scaled(out, eng.run(run, what, seq))


def _allreduce_general(x, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking, wake):
    given, asked = name, op
    op = as_op(op)
    _arguments("allreduce", name, prescale_factor, postscale_factor)
    prescale_factor, postscale_factor = float(prescale_factor), float(postscale_factor)  # 1, 1.0: one value
    _, comm, eng, seq, name = _begin(process_set, "allreduce", name)
    key = None if type(x) is not numpy.ndarray else _plan_key(comm, x, asked, given, prescale_factor,
                                                              postscale_factor, inplace)
    x = _array(x, name, "allreduce")
    check_reduction(op, x.dtype, f"allreduce of tensor {name!r}", prescale_factor != 1 or postscale_factor != 1)
    if inplace:
        _writable(x, name, "allreduce_")
    xp = get_array_module(x)
    post = postscale_factor / comm.Get_size() if op is Average else postscale_factor
    mop = mpi_op(op, x.dtype)
    later = 1.0  # a factor for the caller's own host memory, applied once the ranks agreed
    if inplace or prescale_factor != 1.0:  # reduce in place in a contiguous work array
        work = x if (inplace and x.flags.c_contiguous) else _copy(xp, x)
        if work is x and xp is numpy:  # (a MismatchError must leave the caller's array as it was)
            later = prescale_factor
        else:
            scale(work, prescale_factor)
        send, recv = None, Staged(work)
    else:
        send = Staged(xp.ascontiguousarray(x))
        recv = Staged(empty_result(xp, x.shape, x.dtype), copy_in=False)
        work = recv.array
    path = _path(recv.host, comm, op, send is None)
    signature = _signature(eng, "allreduce", given, ("op", op.name), ("dtype", dtype_name(x.dtype)),
                           ("shape", x.shape), ("path", path),
                           ("prescale_factor", prescale_factor), ("postscale_factor", postscale_factor),
                           ("piece bytes", _buffers.piece_bytes()))
    if key is not None:
        _keep_plan(eng, key, signature, x, op, prescale_factor, postscale_factor, inplace, mop, post, path)

    # (carried only from checked fields: with a prescale the caller's own array is scaled after the check)
    carry = ((recv.host if send is None else send.host)
             if _carries(comm, path, x.dtype, x.nbytes) and prescale_factor == 1.0 else None)

    def carried():
        check.reduce_carried(eng, recv.host, mop, mpi_type(x.dtype))
        return False

    def body(joined):
        nonlocal post
        if joined and op is Average:
            post = average_factor(postscale_factor, comm.Get_size(), joined)
        scale(work, later)
        return _reduce(comm, path, None if send is None else flat(send.host), flat(recv.host), mop, op.ufunc,
                       post, seq)

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

    return _launch(eng, blocking, _job(comm, "allreduce", name, signature, seq, body, carry, carried), name, seq,
                   finish, _release(send, recv), wake)


def fused_allreduce_async_(x, name, process_set=None, wake=True, postscale_factor=1.0, average=False):
    """Start summing ``x`` (a fusion buffer) in place over the ranks, times ``postscale_factor``
    (folded into the ring where it applies: an average costs no extra pass); ``average`` divides
    it by the ranks that contribute (all, unless some joined).

    ``wake=False`` leaves the engine thread asleep: the caller waits for the result at
    once and so runs the exchange in its own thread. The mismatch check stays on: it
    is what turns a rank that skipped a collective into a MismatchError (about 4 us).
    """
    return _allreduce_core(x, Average if average else Sum, name, 1.0, postscale_factor, process_set, True, False,
                           wake)


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

def _grouped_arrays(tensors, name, inplace):
    """Validate ``tensors`` locally, with per-dtype work done once per dtype (a grouped call often
    has hundreds of tensors of one dtype); returns (arrays, their dtypes)."""
    what = "grouped_allreduce_" if inplace else "grouped_allreduce"
    if set(map(type, tensors)) - {numpy.ndarray}:
        tensors = [_array(t, f"{name}[{i}]", "grouped_allreduce") for i, t in enumerate(tensors)]
    dtypes = list(map(_DTYPE, tensors))
    for dtype in dict.fromkeys(dtypes):
        check_dtype(dtype, f"grouped_allreduce of tensor {name}[{dtypes.index(dtype)}]")
    if inplace and not all(map(_WRITEABLE, tensors)):
        i = next(i for i, t in enumerate(tensors) if not t.flags.writeable)
        _writable(tensors[i], f"{name}[{i}]", what)
    return tensors, dtypes


_DTYPE, _SHAPE, _SIZE, _WRITEABLE = (operator.attrgetter(a) for a in ("dtype", "shape", "size", "flags.writeable"))


ALONE_BYTES = 1 << 20
"""A grouped call's tensors of at least this size are reduced by themselves (in place where the call
is and the tensor is contiguous) rather than copied into and out of the dtype's fused buffer: the
two copies cost more than another collective's few MPI calls."""


class _GroupedPlan:
    """What a grouped call's layout and checked fields come to, kept for calls with the same dtypes,
    shapes and arguments (a training step repeats one every step): ``buffers`` is one
    (dtype, mpi op, unpack, alone) per exchange, ``unpack`` its (tensor index, start, end, shape or
    None where a 1-D slice already has it); ``alone`` a big tensor reduced by itself."""

    __slots__ = ("buffers", "signature", "fingerprint", "paths", "post", "average")


def _grouped_key(comm, tensors, op, name, prescale_factor, postscale_factor, inplace):
    """What a grouped plan depends on: an allreduce plan's fields, every dtype and shape, and the
    threshold of the tensors that go alone (a plan made before it moved must not keep the old layout)."""
    return (_plan_key(comm, tensors[0], op, name, prescale_factor, postscale_factor, inplace)[2:]
            + (tuple(map(_DTYPE, tensors)), tuple(map(_SHAPE, tensors)), ALONE_BYTES))


def _grouped_layout(tensors, dtypes, op):
    """The exchanges of a grouped call: one fused buffer per dtype, in order of first appearance,
    and big tensors alone."""
    if len(set(dtypes)) <= 1:
        groups = {dtypes[0]: range(len(tensors))} if tensors else {}
    else:
        groups = {}  # dtype -> indices, in order of first appearance
        for i, dtype in enumerate(dtypes):
            groups.setdefault(dtype, []).append(i)
    buffers = []
    for dtype, idx in groups.items():
        mop = mpi_op(op, dtype)
        small = []
        for i in idx:
            if tensors[i].size * dtype.itemsize >= ALONE_BYTES:
                buffers.append((dtype, mop, ((i, 0, tensors[i].size, tensors[i].shape),), True))
            else:
                small.append(i)
        if small:
            ends = list(itertools.accumulate(tensors[i].size for i in small))
            buffers.append((dtype, mop, tuple((i, a, b, None if len(tensors[i].shape) == 1 else tensors[i].shape)
                                              for i, a, b in zip(small, [0] + ends, ends)), False))
    return buffers


def _grouped_stage(buffers, tensors, xp, inplace):
    """Each exchange's Staged buffer: the caller's big tensor itself where it can be, else a copy."""
    staged, kept = [], []  # kept: big tensors reduced in their own memory
    for dtype, _, unpack, alone in buffers:
        if alone:
            t = tensors[unpack[0][0]]
            # one listed twice (or two views of one memory) is reduced and scaled once in it, the rest in copies
            if inplace and t.flags.c_contiguous and not any(xp.may_share_memory(t, k) for k in kept):
                kept.append(t)
                staged.append(Staged(t))
            else:
                staged.append(Staged(_copy(xp, t)))
            continue
        members = tensors if len(unpack) == len(tensors) else [tensors[u[0]] for u in unpack]
        fused = Staged(empty_result(xp, (unpack[-1][2],), dtype), copy_in=False)
        if xp is numpy:  # one copy of every tensor, straight into the buffer MPI reads, in one call
            numpy.concatenate(members, axis=None, out=fused.host)
        elif fused.host is fused.array:  # device memory under a CUDA-aware MPI
            for t, (_, a, b, _) in zip(members, unpack):
                fused.host[a:b].reshape(t.shape)[...] = t
        else:
            for t, (_, a, b, _) in zip(members, unpack):
                view = fused.host[a:b].reshape(t.shape)
                t.get(out=view) if t.flags.c_contiguous else xp.ascontiguousarray(t).get(out=view)
        staged.append(fused)
    return staged


def _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, inplace, blocking):
    given = name
    _, comm, eng, seq, name = _begin(process_set, "grouped_allreduce", name)
    tensors = list(tensors)
    host = bool(tensors) and set(map(type, tensors)) <= {numpy.ndarray}
    _arguments("grouped_allreduce", given, prescale_factor, postscale_factor)  # (a Decimal equals a float key)
    key = _grouped_key(comm, tensors, op, given, prescale_factor, postscale_factor, inplace) if host else None
    try:
        plan = eng.plans.get(key) if key is not None else None
    except TypeError:  # an unhashable op: as_op says what is wrong with it
        plan = key = None
    if plan is None or (inplace and not all(map(_WRITEABLE, tensors))):
        plan = None
        op = as_op(op)
        prescale_factor, postscale_factor = float(prescale_factor), float(postscale_factor)
        tensors, dtypes = _grouped_arrays(tensors, name, inplace)
        for dtype in dict.fromkeys(dtypes):
            check_reduction(op, dtype, f"grouped_allreduce of tensor {name}[{dtypes.index(dtype)}]",
                            prescale_factor != 1 or postscale_factor != 1)
        buffers = _grouped_layout(tensors, dtypes, op)
    else:
        buffers = plan.buffers
    xp = numpy if host or set(map(type, tensors)) <= {numpy.ndarray} else get_array_module(*tensors)
    staged = _grouped_stage(buffers, tensors, xp, inplace)
    # a big tensor reduced in the caller's own host memory is scaled once the ranks agreed (a MismatchError
    # must leave it as it was); the rest are copies
    later = [alone and xp is numpy and s.host is tensors[unpack[0][0]]
             for (_, _, unpack, alone), s in zip(buffers, staged)]
    for s, wait in zip(staged, later):
        if not wait:
            scale(s.host, prescale_factor)
    if plan is None:
        plan = _GroupedPlan()
        plan.buffers = buffers
        plan.average = op is Average
        plan.post = postscale_factor / comm.Get_size() if plan.average else postscale_factor
        plan.paths = tuple(_path(s.host, comm, op, True) for s in staged)
        names = {dtype: dtype_name(dtype) for dtype in dict.fromkeys(dtypes)}
        plan.signature = _signature(
            eng, "grouped_allreduce", given, ("op", op.name),
            ("tensors", tuple(zip(map(names.__getitem__, dtypes), map(_SHAPE, tensors)))),
            ("buffers", tuple((names[dtype], unpack[-1][2]) for dtype, _, unpack, _ in buffers)),
            ("path", plan.paths), ("prescale_factor", prescale_factor), ("postscale_factor", postscale_factor),
            ("piece bytes", _buffers.piece_bytes()))
        plan.fingerprint = check.fingerprint(plan.signature)
        if key is not None:
            _keep(eng, key, plan)
    post, ufunc = plan.post, as_op(op).ufunc

    def body(joined):
        nonlocal post
        if joined and plan.average:
            post = average_factor(postscale_factor, comm.Get_size(), joined)
        for s, wait in zip(staged, later):
            if wait:
                scale(s.host, prescale_factor)
        return [_reduce(comm, path, None, flat(s.host), mop, ufunc, post, seq)
                for (_, mop, _, _), s, path in zip(buffers, staged, plan.paths)]

    def finish(scaled):
        out = list(tensors) if inplace else [None] * len(tensors)
        for (_, _, unpack, _), s, done in zip(buffers, staged, scaled):
            result = s.finish()
            if not done:
                scale(result, post)
            if result is tensors[unpack[0][0]]:  # a big tensor reduced in the caller's own memory
                continue
            result = flat(result)
            if inplace:
                for i, a, b, shape in unpack:
                    tensors[i][...] = result[a:b] if shape is None else result[a:b].reshape(shape)
            else:
                for i, a, b, shape in unpack:
                    out[i] = result[a:b] if shape is None else result[a:b].reshape(shape)
        return out

    return _launch(eng, blocking, _job(comm, "grouped_allreduce", name, plan.signature, seq, body,
                                       known=plan.fingerprint), name, seq, finish, _release(*staged))


def grouped_allreduce(tensors, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                      process_set=None):
    """New arrays: each tensor reduced, in one check and one fused exchange per dtype (tensors of
    ``ALONE_BYTES`` or more by themselves)."""
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, False, True)


def grouped_allreduce_(tensors, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=None):
    """Reduce each tensor in place, in one check and one fused exchange per dtype (tensors of
    ``ALONE_BYTES`` or more by themselves, in their own memory)."""
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, True, True)


def grouped_allreduce_async(tensors, op=Average, name=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None):
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, False, False)


# --- allgather ----------------------------------------------------------------------------------

def _allgather_core(x, name, process_set, blocking):
    if type(x) is numpy.ndarray and not timeline.enabled():  # a host array: through its plan, if one was kept
        eng = _engine_of(process_set)
        try:
            plan = eng.plans.get(_allgather_key(eng.comm, x, name))
        except TypeError:  # an unhashable name: the general path says what is wrong with it
            plan = None
        if plan is not None:
            return _allgather_short(eng, plan, x, blocking)
    return _allgather_general(x, name, process_set, blocking)


def _allgather_key(comm, x, name):
    """What an allgather's plan depends on: the call's fields, and the topology and its crossover."""
    topo = runtime._state.topology if comm is runtime._state.comm else runtime.topology(comm)
    return "allgather", x.dtype, x.shape, name, topo, None if topo is None else topo.from_bytes


def _allgather_short(eng, plan, x, blocking):
    """A repeated host allgather: its checked fields, their fingerprint and its carry kept (``plan``)."""
    seq = eng.started()
    what = plan[-1] or f"allgather.{seq}"
    send = numpy.ascontiguousarray(x).reshape(-1)
    return _run_planned(eng, blocking, what, seq, _allgather_planned, eng, plan, send, what, seq)


def _allgather_planned(eng, plan, send, what, seq):
    """Run an allgather through its plan as a job of ``eng``; the gathered array."""
    signature, fingerprint, carry, topo, start, tail, dtype, rows, _ = plan
    comm, joined = eng.comm, ()
    if check._enabled:
        if carry is not None and len(carry) > 8:
            carry[8:] = send.view(numpy.uint8)
        if not check.meet(eng, check.stamp(fingerprint, seq), carry):
            joined = check.differ(comm, "allgather", what, signature, seq)
    try:
        if check._enabled and carry is not None and not joined:
            return _allgather_carried(eng, topo, start, send, tail, dtype)
        return _allgather_rows(comm, topo, start, send, _allgather_counts(comm, rows), tail, dtype)
    except BaseException as exc:
        _fatal.after_agreement(comm, f"allgather of tensor {what!r}", exc)


def _allgather_counts(comm, rows):
    """Every rank's row count, in one Allgather (a joined rank gives 0)."""
    table = numpy.empty(comm.Get_size(), dtype=numpy.int64)
    comm.Allgather(numpy.array([rows], dtype=numpy.int64), table)
    return table


def _allgather_rows(comm, topo, start, send, table, tail, dtype):
    """Gather every rank's rows (``table``: every rank's row count) from 1-D host ``send``."""
    counts = table * math.prod(tail)
    displs = numpy.concatenate(([0], numpy.cumsum(counts)[:-1]))
    out = empty_result(numpy, (int(table.sum()),) + tail, dtype)
    _hierarchical.allgatherv(comm, topo, start, send, flat(out), counts, displs, mpi_type(dtype))
    return out


def _allgather_carried(eng, topo, start, send, tail, dtype):
    """The result after a check that carried every rank's row count (and its rows, where they fit)."""
    table = check.carried(eng, 8).view(numpy.int64)[:, 0].tolist()  # (a few ints: Python's own are quickest)
    if min(table) < 0:  # some rank's rows did not fit: the counts came, the rows go now
        table = numpy.array([-1 - count if count < 0 else count for count in table], dtype=numpy.int64)
        return _allgather_rows(eng.comm, topo, start, send, table, tail, dtype)
    rows = check.carried(eng, check.carrying(eng.comm))
    size = math.prod(tail) * dtype.itemsize
    parts = [rows[r, 8:8 + count * size] for r, count in enumerate(table)]
    return numpy.concatenate(parts).view(dtype).reshape((sum(table),) + tail)


def _allgather_general(x, name, process_set, blocking):
    given = name
    _, comm, eng, seq, name = _begin(process_set, "allgather", name)
    key = _allgather_key(comm, x, given) if type(x) is numpy.ndarray else None
    x = _array(x, name, "allgather")
    xp = get_array_module(x)
    x = xp.ascontiguousarray(x.reshape(1) if x.ndim == 0 else x)
    rows, tail = x.shape[0], tuple(x.shape[1:])
    topo = runtime.topology(comm)
    start = topo.gathers() if topo is not None else None
    signature = _signature(eng, "allgather", given, ("dtype", dtype_name(x.dtype)), ("shape[1:]", tail),
                           ("hierarchical from", start))
    send = Staged(x)
    # every rank's row count travels in the check, and its rows too where they fit: the ranks
    # then know the counts (no call for them) and, when every rank's rows came along, the result
    room = check.carrying(comm) - 8
    fits = 0 <= x.nbytes <= room
    carry = numpy.empty(8 + (x.nbytes if fits else 0), dtype=numpy.uint8) if room > 0 else None
    if carry is not None:
        carry[:8].view(numpy.int64)[0] = rows if fits else -1 - rows  # negative: the rows did not fit
    if key is not None:  # the next call like this one takes the short path (its own carry, filled in its job)
        try:
            _keep(eng, key, (signature, check.fingerprint(signature), None if carry is None else carry.copy(), topo,
                             start, tail, x.dtype, rows, given))
        except TypeError:  # an unhashable name: left to the check's own message
            pass
    if carry is not None and fits and x.nbytes:
        carry[8:] = _on_host(flat(send.host)).view(numpy.uint8)

    def body(joined):  # a joined rank gives zero rows
        return _allgather_rows(comm, topo, start, flat(send.host), _allgather_counts(comm, rows), tail, x.dtype)

    def carried():
        return _allgather_carried(eng, topo, start, flat(send.host), tail, x.dtype)

    def finish(out):
        send.finish(copy_out=False)
        return out if xp is numpy else xp.asarray(out)

    return _launch(eng, blocking, _job(comm, "allgather", name, signature, seq, body, carry, carried), name, seq,
                   finish, _release(send))


def allgather(x, name=None, process_set=None):
    """Concatenation of every rank's ``x`` along axis 0 (first dimensions may differ; 0-d gives (size,))."""
    return _allgather_core(x, name, process_set, True)


def allgather_async(x, name=None, process_set=None):
    return _allgather_core(x, name, process_set, False)


# --- broadcast ----------------------------------------------------------------------------------

def _broadcast_core(x, root_rank, name, process_set, inplace, blocking):
    # a host array and an int root (1.0 would find the plan of 1): through its plan, if one was kept
    if type(x) is numpy.ndarray and type(root_rank) is int and not timeline.enabled():
        eng = _engine_of(process_set)
        try:
            plan = eng.plans.get(("broadcast", x.dtype, x.shape, root_rank, name, inplace))
        except TypeError:  # an unhashable argument: the general path says what is wrong with it
            plan = None
        if plan is not None and (not inplace or (x.flags.c_contiguous and x.flags.writeable)):
            return _broadcast_short(eng, plan, x, inplace, blocking)
    return _broadcast_general(x, root_rank, name, process_set, inplace, blocking)


def _broadcast_short(eng, plan, x, inplace, blocking):
    """A repeated host broadcast: the checked fields, their fingerprint and the root kept (``plan``)."""
    seq = eng.started()
    what = plan[4] or f"broadcast.{seq}"
    if inplace:
        work = x
    elif eng.comm.Get_rank() == plan[2]:
        work = _copy(numpy, x)
    else:  # every byte is the root's once it has run
        work = empty_result(numpy, x.shape, x.dtype)
    return _run_planned(eng, blocking, what, seq, _broadcast_planned, eng, plan, work, what, seq)


def _run_planned(eng, blocking, what, seq, job, *args):
    """``job(*args)`` of a planned collective: right here when blocking and the engine is free (no
    closures), else in order behind the queue (a handle where not blocking)."""
    if blocking:
        outer = eng.claim(what, seq)
        if outer is not _engine._BUSY:
            try:
                return job(*args)
            finally:
                eng.unclaim(outer)
    run = functools.partial(job, *args)
    return eng.run(run, what, seq) if blocking else eng.submit(run, what, seq)


def _broadcast_planned(eng, plan, work, what, seq):
    """Run a broadcast through its plan as a job of ``eng``, into ``work`` (C-contiguous host memory);
    returns ``work``."""
    signature, fingerprint, root, carrier, _ = plan
    comm, carried = eng.comm, False
    if check._enabled:
        if carrier is not None and comm.Get_rank() == root:  # the root's payload travels in its row
            carrier.mine[...] = work
        if check.meet(eng, check.stamp(fingerprint, seq)):
            carried = carrier is not None
        else:  # a joined rank carries nothing: then the transfer is an MPI call
            check.differ(comm, "broadcast", what, signature, seq)
    try:
        if not carried:
            bcast_pieces(comm, work.reshape(-1), root)
        elif comm.Get_rank() != root:
            work[...] = carrier.rows[root]
    except BaseException as exc:
        _fatal.after_agreement(comm, f"broadcast of tensor {what!r}", exc)
    return work


def _broadcast_general(x, root_rank, name, process_set, inplace, blocking):
    given = name
    ps, comm, eng, seq, name = _begin(process_set, "broadcast", name)
    root_rank = _process_set.job_rank(root_rank, f"broadcast of tensor {name!r}")
    root = ps.to_local(root_rank)
    x = _array(x, name, "broadcast")
    if inplace:
        _writable(x, name, "broadcast_")
    xp = get_array_module(x)
    work = x if (inplace and x.flags.c_contiguous) else _copy(xp, x)
    signature = _signature(eng, "broadcast", given, ("root_rank", root_rank), ("dtype", dtype_name(x.dtype)),
                           ("shape", tuple(x.shape)))
    buf = Staged(work, copy_in=comm.Get_rank() == root)
    # a small message travels in the root's row of the check (whatever memory it is in: the
    # broadcast's signature does not say, and ranks must decide alike); the others carry nothing
    carry = None
    if 0 < x.nbytes <= check.carrying(comm):
        carry = _on_host(flat(buf.host)).view(numpy.uint8) if comm.Get_rank() == root else _NOTHING
    if type(x) is numpy.ndarray:  # the next call like this one takes the short path
        try:
            _keep(eng, ("broadcast", x.dtype, x.shape, root_rank, given, inplace),
                  (signature, check.fingerprint(signature), root,
                   None if carry is None else check.Carrier(eng, x.dtype, x.shape), given))
        except TypeError:  # an unhashable name: left to the check's own message
            pass

    def body(joined):
        bcast_pieces(comm, flat(buf.host), root)

    def carried():  # a copy: the check's rows are the next check's
        return check.carried(eng, x.nbytes)[root].copy()

    def finish(got):
        if got is not None:  # written in the caller's thread, on its device and stream
            target = flat(buf.host)
            target[...] = got.view(x.dtype) if isinstance(target, numpy.ndarray) else xp.asarray(got.view(x.dtype))
        buf.finish()
        if inplace and work is not x:
            x[...] = work
            return x
        return work

    return _launch(eng, blocking, _job(comm, "broadcast", name, signature, seq, body, carry, carried), name, seq,
                   finish, _release(buf))


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
    given = name
    _, comm, eng, seq, name = _begin(process_set, "alltoall", name)
    n = comm.Get_size()
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
    signature = _signature(eng, "alltoall", given, ("dtype", dtype_name(x.dtype)), ("shape[1:]", tail))
    send = Staged(xp.ascontiguousarray(x))

    def body(joined):
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

    return _launch(eng, blocking, _job(comm, "alltoall", name, signature, seq, body), name, seq, finish,
                   _release(send))


def alltoall(x, splits=None, name=None, process_set=None):
    """Send ``splits[r]`` rows of ``x`` to rank r; returns (received rows, rows received from each rank)."""
    return _alltoall_core(x, splits, name, process_set, True)


def alltoall_async(x, splits=None, name=None, process_set=None):
    return _alltoall_core(x, splits, name, process_set, False)


# --- reducescatter ------------------------------------------------------------------------------

def _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, blocking):
    op = as_op(op)
    given = name
    _, comm, eng, seq, name = _begin(process_set, "reducescatter", name)
    n, me = comm.Get_size(), comm.Get_rank()
    x = _array(x, name, "reducescatter")
    if x.ndim == 0:
        raise ValueError(f"reducescatter of tensor {name!r} needs at least one dimension, got a 0-d array")
    check_reduction(op, x.dtype, f"reducescatter of tensor {name!r}", prescale_factor != 1 or postscale_factor != 1)
    xp = get_array_module(x)
    rows, tail = x.shape[0], tuple(x.shape[1:])
    row = math.prod(tail)
    base, extra = divmod(rows, n)
    mine = base + (me < extra)  # the first ``extra`` ranks get one row more
    counts = numpy.array([(base + (r < extra)) * row for r in range(n)], dtype=numpy.int64)
    mop = mpi_op(op, x.dtype)
    work = _copy(xp, x) if prescale_factor != 1 else xp.ascontiguousarray(x)
    scale(work, prescale_factor)
    post = postscale_factor / n if op is Average else postscale_factor
    send = Staged(work)
    recv = Staged(empty_result(xp, (mine,) + tail, x.dtype), copy_in=False)
    topo = runtime.topology(comm)
    path = (f"hierarchical ({topo.describe()} nodes)" if topo is not None and topo.even and topo.uses(send.host)
            else _path(send.host, comm, op, hierarchical=False))
    signature = _signature(eng, "reducescatter", given, ("op", op.name), ("dtype", dtype_name(x.dtype)),
                           ("shape", tuple(x.shape)), ("path", path),
                           ("prescale_factor", prescale_factor), ("postscale_factor", postscale_factor),
                           ("piece bytes", _buffers.piece_bytes()))

    def body(joined):
        if not rows:
            return True
        if path.startswith("hierarchical"):
            return _hierarchical.reduce_scatter(topo, flat(send.host), flat(recv.host), counts, mop, op.ufunc)
        return reduce_scatter_pieces(comm, flat(send.host), flat(recv.host), counts, mop, op.ufunc, post, seq)

    def finish(scaled):
        send.finish(copy_out=False)
        out = recv.finish()
        if not scaled:
            scale(out, post)
        return out

    return _launch(eng, blocking, _job(comm, "reducescatter", name, signature, seq, body), name, seq, finish,
                   _release(send, recv))


def reducescatter(x, op=Average, name=None, process_set=None, prescale_factor=1.0, postscale_factor=1.0):
    """This rank's rows of ``x`` reduced over the ranks (the first ranks get one row more)."""
    return _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, True)


def reducescatter_async(x, op=Average, name=None, process_set=None, prescale_factor=1.0,
                        postscale_factor=1.0):
    return _reducescatter_core(x, op, name, process_set, prescale_factor, postscale_factor, False)


# --- the rest -----------------------------------------------------------------------------------

def barrier(process_set=None):
    """Wait until every rank (of the set) gets here."""
    _, comm, eng, seq, name = _begin(process_set, "barrier", None)
    _take(eng, seq, name)
    eng.run(_job(comm, "barrier", name, _signature(eng, "barrier", None), seq, lambda joined: comm.Barrier()),
            name, seq)


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


def grouped_allreduce_async_(tensors, op=Average, name=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=None):
    """Start reducing each tensor in place, in one fused exchange per dtype."""
    return _grouped_core(tensors, op, name, prescale_factor, postscale_factor, process_set, True, False)


# Arrays of other frameworks (PyTorch, JAX, ...) in, the same type out (dlpack.py).
# (allreduce's core does it itself.)
allgather, allgather_async, broadcast, broadcast_async, alltoall, alltoall_async, reducescatter, \
    reducescatter_async = (
        _dlpack.tensor_op(f) for f in (allgather, allgather_async, broadcast, broadcast_async, alltoall,
                                       alltoall_async, reducescatter, reducescatter_async))
broadcast_, broadcast_async_ = (_dlpack.tensor_op(f, inplace=True) for f in (broadcast_, broadcast_async_))
grouped_allreduce, grouped_allreduce_async = (
    _dlpack.grouped_op(f) for f in (grouped_allreduce, grouped_allreduce_async))
grouped_allreduce_, grouped_allreduce_async_ = (
    _dlpack.grouped_op(f, inplace=True) for f in (grouped_allreduce_, grouped_allreduce_async_))
__all__.append("grouped_allreduce_async_")
