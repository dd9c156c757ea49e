"""``join()``, as Horovod's: a rank out of data takes part in the others' collectives with nothing
to give, until every rank has joined.

A joined rank loops on the cross-rank check with a sentinel fingerprint. The ranks still
running a collective then see a mismatch and take the check's rare path, where every rank
(joined or not) gathers every rank's signature and ``settle`` makes one decision from the
same rows on all of them: an error, or the collective runs with the joined ranks. They
contribute the op's identity to reductions (zeros for Sum; an Average divides by the ranks
that contributed), zero rows to allgathers, and receive broadcasts. When every rank's
fingerprint is the sentinel, every rank has joined and ``join()`` returns on all of them.
"""
import math

import numpy
from mpi4py import MPI
from mpi4py.util import pkl5

from ..errors import MpidpError
from . import _buffers, _fatal, check
from ._buffers import allreduce_pieces, bcast_pieces
from .engine import engine_for
from .ops import Average, HALF, as_op, mpi_op, mpi_type
from .process_set import resolve

SENTINEL = -1  # real fingerprints are in [0, 2**62): every other rank sees a mismatch
_KIND = ("collective", "join")


def join(process_set=None):
    """Say this rank has no more data: until every rank of the set has called ``join()``, take part
    in the others' collectives on the set with nothing to contribute. Returns (on every rank) the
    job rank that joined last."""
    ps, comm = resolve(process_set)
    if not check.is_enabled():
        raise MpidpError("join() needs the cross-rank check, which is off (MPIDP_CHECK=0 or set_check(False)): "
                         "the other ranks learn that this rank joined from it; turn it on on every rank")
    eng = engine_for(comm)
    seq = eng.started()
    return eng.run(lambda: _serve(comm, eng, seq), "join", seq)


def is_joined(row):
    """Whether a row gathered by the check's rare path comes from a joined rank."""
    return row[1][:1] == (_KIND,)


def settle(comm, rows, advice=None):
    """Some ranks joined (``rows``: every rank's (name, signature)): the same decision on every rank.

    Returns the joined ranks (indices in ``comm``) when the other ranks agree and their
    collective can run with joined ranks; else raises MismatchError or MpidpError.
    """
    joined = tuple(r for r, row in enumerate(rows) if is_joined(row))
    active = [None if r in joined else row for r, row in enumerate(rows)]
    first = next(row for row in active if row is not None)
    fields = dict(first[1])
    kind = fields["collective"]
    if any(row is not None and row != first for row in active):
        raise check.mismatch_error(kind, active, comm, advice)
    ranks = check._world_ranks(comm)
    who = ",".join(str(ranks[r]) for r in joined)
    what = f"{kind} of {first[0]!r} cannot run while rank{'s' if len(joined) > 1 else ''} {who} " \
           f"{'have' if len(joined) > 1 else 'has'} joined (mpidp.join)"
    if kind not in _SERVE:
        raise MpidpError(f"{what}: joined ranks take part only in allreduce, grouped_allreduce, allgather, "
                         f"broadcast, barrier and the object collectives; call it before any rank joins")
    if "root_rank" in fields and fields["root_rank"] in [ranks[r] for r in joined]:
        raise MpidpError(f"{what}: its root rank {fields['root_rank']} has joined and has nothing to send; "
                         f"broadcast from a rank that has not joined")
    theirs = {dict(rows[r][1])["piece bytes"] for r in joined}
    if "piece bytes" in fields and theirs != {fields["piece bytes"]}:
        raise MpidpError(f"{what}: piece bytes differs (ranks that have not joined use {fields['piece bytes']}, "
                         f"joined ranks {sorted(theirs)}); set the same MPIDP_PIECE_BYTES on every rank")
    return joined


def average_factor(postscale_factor, size, joined):
    """An Average's factor after the sum: ``postscale_factor`` over the ranks that contributed."""
    return postscale_factor / (size - len(joined))


def _serve(comm, eng, seq):
    """The joined rank's loop, run as one job of ``comm``'s engine."""
    n, me = comm.Get_size(), comm.Get_rank()
    row = ("join", (_KIND, ("piece bytes", _buffers.piece_bytes())))
    while True:
        if check.meet(eng, SENTINEL):
            break  # every rank has joined
        rows = comm.allgather(row)
        joined = settle(comm, rows)
        name, signature = next(r for r in rows if not is_joined(r))
        fields = dict(signature)
        try:
            _SERVE[fields["collective"]](comm, fields, joined)
        except BaseException as exc:
            _fatal.after_agreement(comm, f"join's part in {fields['collective']} of {name!r}", exc)
        eng.progress.wait_seq = fields["sequence number"] + 1  # peers' stall reports: this rank is in it
        eng.progress.tick()  # the others are progressing: waiting in join is not a stall
    # the last rank to join did so at the highest collective number; ties go to the highest rank
    last = numpy.array([seq * n + me], dtype=numpy.int64)
    comm.Allreduce(MPI.IN_PLACE, last, op=MPI.MAX)
    top, who = divmod(int(last[0]), n)
    eng.progress.seq = max(eng.progress.seq, top)  # the collectives served count here too
    return int(check._world_ranks(comm)[who])


# --- a joined rank's part in each collective ------------------------------------------------------

def _identity(op, dtype):
    """What a joined rank contributes to a reduction: the op's neutral element."""
    if op.name == "Product":
        return 1
    if op.name in ("Min", "Max"):
        if dtype.kind == "b":
            return op.name == "Min"
        if dtype.kind in "iu":
            info = numpy.iinfo(dtype)
            return info.max if op.name == "Min" else info.min
        return numpy.inf if op.name == "Min" else -numpy.inf
    return 0


def _scratch(dtype, count):
    raw = _buffers.pool.acquire(count * dtype.itemsize)
    return raw, raw[:count * dtype.itemsize].view(dtype)


def _reduce(comm, op, dtype, count, path, factor, seq):
    """Take part in an allreduce of ``count`` elements with the identity, on the same ``path``
    (ring, hierarchical, or MPI calls in place or out of place) as the ranks that contribute."""
    ring = path.startswith("ring")
    raw, buf = _scratch(dtype, count)
    out = None
    try:
        buf.fill(_identity(op, dtype))
        if path.startswith("hierarchical"):  # a multi-node job's large message: through the nodes
            from . import _hierarchical, runtime
            _hierarchical.allreduce(runtime.topology(comm), None, buf, mpi_op(op, dtype), op.ufunc, factor)
        elif ring or path.endswith("in place"):
            allreduce_pieces(comm, None, buf, mpi_op(op, dtype), op.ufunc if ring else None, factor, seq)
        else:
            out = _scratch(dtype, count)
            allreduce_pieces(comm, buf, out[1], mpi_op(op, dtype), None, factor, seq)
    finally:
        _buffers.pool.release(raw)
        if out is not None:
            _buffers.pool.release(out[0])


def _factor(fields, n, joined):
    post = fields["postscale_factor"]
    return average_factor(post, n, joined) if as_op(fields["op"]) is Average else post


def _allreduce(comm, fields, joined):
    op, dtype = as_op(fields["op"]), _dtype(fields["dtype"])
    _reduce(comm, op, dtype, math.prod(fields["shape"]), fields["path"],
            _factor(fields, comm.Get_size(), joined), fields["sequence number"])


def _grouped_allreduce(comm, fields, joined):
    op = as_op(fields["op"])
    factor = _factor(fields, comm.Get_size(), joined)
    for (name, count), path in zip(fields["buffers"], fields["path"]):  # the ranks' buffers, in order
        _reduce(comm, op, _dtype(name), count, path, factor, fields["sequence number"])


def _allgather(comm, fields, joined):
    dtype, tail = _dtype(fields["dtype"]), tuple(fields["shape[1:]"])
    table = numpy.empty(comm.Get_size(), dtype=numpy.int64)
    comm.Allgather(numpy.zeros(1, dtype=numpy.int64), table)  # this rank gives zero rows
    counts = table * math.prod(tail)
    displs = numpy.concatenate(([0], numpy.cumsum(counts)[:-1]))
    raw, out = _scratch(dtype, int(counts.sum()))
    try:
        from . import _hierarchical, runtime
        # the way the others' checked crossover says, not this rank's own
        _hierarchical.allgatherv(comm, runtime.topology(comm), fields["hierarchical from"], numpy.empty(0, dtype=dtype),
                                 out, counts, displs, mpi_type(dtype))
    finally:
        _buffers.pool.release(raw)


def _root(comm, fields):
    return list(check._world_ranks(comm)).index(fields["root_rank"])


def _broadcast(comm, fields, joined):
    dtype = _dtype(fields["dtype"])
    raw, buf = _scratch(dtype, math.prod(fields["shape"]))
    try:
        bcast_pieces(comm, buf, _root(comm, fields))
    finally:
        _buffers.pool.release(raw)


def _dtype(name):
    for half in HALF:  # bfloat16 is not a name NumPy knows
        if half.name == name:
            return half
    return numpy.dtype(name)


def _nothing(comm, fields, joined):
    """A check with no transfer after it (an optimizer's plan check)."""


_SERVE = {
    "allreduce": _allreduce,
    "grouped_allreduce": _grouped_allreduce,
    "allgather": _allgather,
    "broadcast": _broadcast,
    "barrier": lambda comm, fields, joined: comm.Barrier(),
    "broadcast_object": lambda comm, fields, joined: pkl5.Intracomm(comm).bcast(None, root=_root(comm, fields)),
    "allgather_object": lambda comm, fields, joined: pkl5.Intracomm(comm).allgather(None),
    "DistributedOptimizer": _nothing,
}
