"""Cheap cross-rank agreement check: one small MPI call, details only when ranks differ.

Every collective starts with it, so ranks that are about to run different collectives
(an allreduce here, an allgather there) meet in the same MPI call and all raise
MismatchError instead of hanging in different ones. Up to ``GATHER_RANKS`` ranks that
call is an Allgather of one ``ROW``-byte row per rank: the fingerprint, then room for a
small collective's whole payload (a loss, a metric, an overflow flag), which then needs
no MPI call of its own. Above, it is a 16-byte MIN Allreduce, whose cost grows with the
logarithm of the ranks where an allgather's grows with the ranks.
"""
import hashlib
import numbers
import threading

import numpy
from mpi4py import MPI

from .. import _env
from ..errors import MismatchError, describe_ranks
from . import engine as _engine

_MASK = (1 << 62) - 1
_MIX = 0x9E3779B97F4A7C15  # spreads the sequence number over all 62 bits


_enabled = _env.get("MPIDP_CHECK")


def is_enabled():
    return _enabled


def set_enabled(enabled):
    """Turn the check of every collective on or off (every rank alike); returns the old setting."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


GATHER_RANKS = 32
ROW = 128
"""Bytes each rank sends in the check where the check is an Allgather: 8 of fingerprint, then up to
``ROW - 8`` of payload (the same on every rank: every collective's first call must match)."""


def carrying(comm):
    """Bytes of payload the check on ``comm`` can carry (0 where it carries none)."""
    return ROW - 8 if comm.Get_size() <= GATHER_RANKS else 0


_known = {}  # signature -> fingerprint: training repeats the same few signatures every step


def fingerprint(signature):
    """A stable 62-bit integer for a tuple of (field, value) pairs: one for equal signatures, whatever
    their spelling (2 and 2.0, a NumPy scalar and a Python number), as the cache below must give."""
    h = _known.get(signature)
    if h is None:
        digest = hashlib.blake2b(repr(_canonical(signature)).encode(), digest_size=8).digest()
        h = int.from_bytes(digest, "little") & _MASK
        if len(_known) > 4096:
            _known.clear()
        _known[signature] = h
    return h


def _canonical(value):
    """``value`` with its numbers spelled one way: equal numbers print alike."""
    if isinstance(value, tuple):
        return tuple(map(_canonical, value))
    if isinstance(value, (numbers.Number, numpy.generic)) and not isinstance(value, str):
        value = value.item() if isinstance(value, numpy.generic) else value
        if isinstance(value, (bool, int)):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def agree(comm, collective, name, signature, advice=None):
    """Raise MismatchError on every rank unless all ranks pass an equal ``signature``.

    ``signature`` is a tuple of (field, value) pairs in a fixed order. Called from any
    thread: the check runs as a job of ``comm``'s engine, in order behind everything
    queued there (inside one of its jobs, at once, as part of that job).
    """
    eng = _engine.engine_for(comm)
    seq = eng.started()
    signature = (("collective", collective),) + tuple(signature)
    eng.run(lambda: compare(comm, collective, name, signature, seq, advice), f"{collective} check", seq)


def compare(comm, collective, name, signature, seq, advice=None, known=None, carry=None):
    """The check itself, for code running as a job of ``comm``'s engine: ``signature`` and the
    communicator's sequence number ``seq`` must be equal on every rank. ``known`` is
    ``fingerprint(signature)`` where the caller kept it (a repeated collective's plan). ``carry``,
    a 1-D host array of at most ``carrying(comm)`` bytes, travels in the check's own message:
    where the check passes, ``reduce_carried`` then reduces what every rank carried. Returns
    the ranks (of ``comm``) that have joined (``mpidp.join``) and take part with nothing to
    contribute: ``()``."""
    eng = _engine.current()
    if eng is None or eng.comm is not comm:
        raise RuntimeError(f"mpidp internal error: the {collective} check of {name!r} ran outside the "
                           f"engine of its communicator; route it through engine_for(comm).run()")
    if meet(eng, stamp(fingerprint(signature) if known is None else known, seq), carry):
        return ()
    return differ(comm, collective, name, signature, seq, advice)


def stamp(fingerprint, seq):
    """What a rank passes to ``meet`` for a signature's ``fingerprint`` at sequence number ``seq``."""
    return fingerprint ^ ((seq * _MIX) & _MASK)


def differ(comm, collective, name, signature, seq, advice=None):
    """The rare path, after ``meet`` found ranks that passed different values: gather what each rank
    passed; returns the joined ranks where the others agree (``mpidp.join``), else raises MismatchError."""
    rows = comm.allgather((name, tuple(signature) + (("sequence number", seq),)))
    from .join import is_joined, settle  # (mpidp.comm.join is the function)
    if any(is_joined(row) for row in rows):
        return settle(comm, rows, advice)
    raise mismatch_error(collective, rows, comm, advice)


class _Meeting:
    """An engine's buffers for the check's MPI call: this rank's row and every rank's."""

    __slots__ = ("gather", "row", "rows", "ids", "mine", "bytes")

    def __init__(self, comm):
        n = comm.Get_size()
        self.gather = n <= GATHER_RANKS
        width = ROW // 8 if self.gather else 2
        self.rows = numpy.zeros((n if self.gather else 1, width), dtype=numpy.int64)
        self.row = self.rows[0] if not self.gather else numpy.zeros(width, dtype=numpy.int64)
        self.ids = self.rows[:, 0]  # every rank's fingerprint, once gathered
        self.mine = memoryview(self.row).cast("B")
        self.bytes = self.rows.view(numpy.uint8)


_making = threading.Lock()


def meeting(eng):
    """``eng``'s buffers for the check (made on first use; new ones when it binds a communicator).
    Made once under a lock: a plan's ``Carrier`` asks for them in the caller's thread while the engine
    thread may be making them for a queued collective, and views of a second set would stay stale."""
    m = eng.meeting
    if m is None:
        with _making:
            m = eng.meeting
            if m is None:
                m = eng.meeting = _Meeting(eng.comm)
    return m


def meet(eng, h, carry=None):
    """The check's one MPI call on ``eng``'s communicator: True when every rank passed ``h``.
    ``carry`` (where the check is an allgather) travels along, for ``reduce_carried``; a ``Carrier``'s
    payload is put in place before."""
    m = eng.meeting or meeting(eng)
    if not m.gather:
        m.row[0], m.row[1] = h, -h
        eng.comm.Allreduce(MPI.IN_PLACE, m.row, op=MPI.MIN)
        return m.row[0] == h and -m.row[1] == h
    m.row[0] = h
    if carry is not None and carry.nbytes:
        m.mine[8:8 + carry.nbytes] = memoryview(carry).cast("B")
    eng.comm.Allgather(m.row, m.rows)
    return m.ids.tolist().count(h) == len(m.ids)


class Carrier:
    """Typed views of a repeated small collective's payload in the rows of ``eng``'s check, made once
    (for its plan): ``mine[...] = x`` before ``meet``, then ``rows[r]`` is what rank r carried (valid
    while ``eng`` keeps its communicator, as the plans are)."""

    __slots__ = ("mine", "rows", "others")

    def __init__(self, eng, dtype, shape):
        m = meeting(eng)
        inner = numpy.empty(shape, dtype).strides  # (the payload is at most ROW - 8 bytes)
        self.mine = numpy.ndarray(shape, dtype, buffer=m.row, offset=8)
        self.rows = numpy.ndarray((len(m.rows),) + tuple(shape), dtype, buffer=m.rows, offset=8,
                                  strides=(m.rows.strides[0],) + inner)
        self.others = [self.rows[r, ...] for r in range(1, len(m.rows))]  # (views, for 0-d payloads too)

    def reduce(self, out, mpi_op, datatype):
        """``reduce_carried`` into ``out`` (C-contiguous, the payload's shape), with the views at hand."""
        out[...] = self.rows[0]
        for row in self.others:
            mpi_op.Reduce_local([row, datatype], [out, datatype])


def carried(eng, nbytes):
    """The first ``nbytes`` that every rank carried in ``eng``'s check that just passed: a uint8
    view, row r from rank r, valid until the next check on the communicator."""
    return eng.meeting.bytes[:, 8:8 + nbytes]


def reduce_carried(eng, out, mpi_op, datatype):
    """Reduce what every rank carried in ``eng``'s check that just passed into ``out`` (a C-contiguous
    host array of the carried size): rank by rank in rank order with MPI's own op, so every rank gets
    the same bits and MPI's semantics (no NumPy error state, wrap-around integers, the op's NaN rules)."""
    rows = carried(eng, out.nbytes)
    memoryview(out).cast("B")[:] = rows[0]
    for row in rows[1:]:
        mpi_op.Reduce_local([row, datatype], [out, datatype])


def mismatch_error(collective, rows, comm, advice=None):
    """MismatchError naming the first field that differs and which ranks have which value
    (rows of None, those of joined ranks, are left out)."""
    ranks = _world_ranks(comm)
    rows = {ranks[r]: row for r, row in enumerate(rows) if row is not None}
    names = {r: row[0] for r, row in rows.items()}
    fields = [f for f, _ in next(iter(rows.values()))[1]]
    for index, field in enumerate(fields):
        values = {r: (row[1][index][1] if index < len(row[1]) else None) for r, row in rows.items()}
        if len(set(map(repr, values.values()))) > 1:
            break
    else:
        field, values = "name", names
    tensor = next(iter(names.values()))
    label = tensor if len(set(names.values())) == 1 else describe_ranks(names)
    if field == "sequence number":
        advice = ("a rank started a collective on this communicator that the others did not (one that "
                  "failed after the local checks on that rank alone counts too), or skipped one")
    advice = advice or (f"every rank must call the same collectives in the same order "
                        f"with the same {field}")
    return MismatchError(
        f"mismatched {collective} of tensor {label!r}: {field} differs ({describe_ranks(values)}); {advice}",
        tensor=tensor, field=field, ranks=values)


def _world_ranks(comm):
    """Ranks of ``comm``'s members in mpidp's main communicator (for messages)."""
    from . import runtime
    world = runtime.get_comm()
    if comm is world:
        return list(range(comm.Get_size()))
    return list(MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.Get_size())),
                                          world.Get_group()))
