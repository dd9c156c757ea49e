"""Cheap cross-rank agreement check: one 16-byte allreduce, details only when ranks differ."""
import hashlib

import numpy
from mpi4py import MPI

from ..errors import MismatchError, describe_ranks

_MASK = (1 << 62) - 1


_known = {}  # signature -> fingerprint: training repeats the same few signatures every step


def fingerprint(signature):
    """A stable 62-bit integer for a tuple of (field, value) pairs."""
    h = _known.get(signature)
    if h is None:
        digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
        h = int.from_bytes(digest, "little") & _MASK
        if len(_known) > 4096:
            _known.clear()
        _known[signature] = h
    return h


def agree(comm, collective, name, signature, advice=None):
    """Raise MismatchError on every rank unless all ranks pass an equal ``signature``.

    ``signature`` is a tuple of (field, value) pairs in a fixed order.
    """
    h = fingerprint(signature)
    both = numpy.array([h, -h], dtype=numpy.int64)
    comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MIN)
    if both[0] == h and -both[1] == h:
        return
    rows = comm.allgather((name, signature))  # the rare path: gather what each rank passed
    raise mismatch_error(collective, rows, comm, advice)


def mismatch_error(collective, rows, comm, advice=None):
    """MismatchError naming the first field that differs and which ranks have which value."""
    ranks = _world_ranks(comm)
    names = {ranks[r]: row[0] for r, row in enumerate(rows)}
    fields = [f for f, _ in rows[0][1]]
    for index, field in enumerate(fields):
        values = {ranks[r]: (row[1][index][1] if index < len(row[1]) else None)
                  for r, row in enumerate(rows)}
        if len(set(map(repr, values.values()))) > 1:
            break
    else:
        field, values = "name", names
    tensor = names[ranks[0]]
    label = tensor if len(set(names.values())) == 1 else describe_ranks(names)
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
