"""Python-object collectives; pickled out of band (mpi4py.util.pkl5) so objects over 2 GiB work."""
from mpi4py.util import pkl5

from . import stall
from .engine import engine
from .process_set import resolve


def broadcast_object(obj, root_rank=0, name=None, process_set=None):
    """``root_rank``'s ``obj`` on every rank."""
    ps, comm = resolve(process_set)
    root = ps.to_local(int(root_rank))
    seq = stall.started()
    return engine.run(lambda: pkl5.Intracomm(comm).bcast(obj, root=root),
                      name or f"broadcast_object.{seq}", seq)


def allgather_object(obj, name=None, process_set=None):
    """A list with every rank's ``obj``, in rank order."""
    _, comm = resolve(process_set)
    seq = stall.started()
    return engine.run(lambda: pkl5.Intracomm(comm).allgather(obj), name or f"allgather_object.{seq}", seq)
