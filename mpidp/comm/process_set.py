"""Process sets: collectives over a subset of the ranks, as Horovod's ``hvd.ProcessSet``."""
from mpi4py import MPI

from . import check, runtime

_created = []


class ProcessSet:
    """A sub-communicator over ``ranks`` (ranks of mpidp's communicator), created collectively.

    Every rank of the job must call ``ProcessSet(ranks)`` with the same list.
    """

    def __init__(self, ranks):
        world = runtime.get_comm()
        ranks = sorted(int(r) for r in ranks)
        n = world.Get_size()
        if not ranks or len(set(ranks)) != len(ranks) or ranks[0] < 0 or ranks[-1] >= n:
            raise ValueError(f"process set ranks {ranks} must be distinct ranks in [0, {n}) and not empty")
        self.ranks = ranks

        def create():
            check.agree(world, "ProcessSet", "process_set", (("ranks", tuple(ranks)),))
            return world.Create(world.Get_group().Incl(ranks))

        comm = runtime._in_order(create, f"ProcessSet({ranks})")  # behind the queued collectives
        self.comm = None if comm == MPI.COMM_NULL else comm
        _created.append(self)

    def included(self):
        """True on the ranks that belong to the set."""
        return self.comm is not None

    def rank(self):
        """This rank's index within the set."""
        return self._member().Get_rank()

    def size(self):
        return len(self.ranks)

    def _member(self):
        if self.comm is None:
            raise ValueError(f"rank {runtime.rank()} is not in process set {self.ranks}; call the "
                             f"collective only on its member ranks")
        return self.comm

    def to_local(self, root_rank):
        """The set-local index of job rank ``root_rank``."""
        if root_rank not in self.ranks:
            raise ValueError(f"root_rank {root_rank} is not in process set {self.ranks}")
        return self.ranks.index(root_rank)

    def __repr__(self):
        return f"ProcessSet({self.ranks})"


class _GlobalSet(ProcessSet):
    """All ranks: mpidp's own communicator."""

    def __init__(self):  # no creation: it is the runtime's communicator
        pass

    @property
    def comm(self):
        return runtime.get_comm()

    @property
    def ranks(self):
        return list(range(runtime.size()))

    def to_local(self, root_rank):
        n = runtime.size()
        if not 0 <= root_rank < n:
            raise ValueError(f"root_rank {root_rank} is outside the communicator of {n} ranks")
        return root_rank

    def __repr__(self):
        return "global_process_set"


global_process_set = _GlobalSet()


def resolve(process_set):
    """The communicator for ``process_set`` (None: all ranks); error on a non-member rank."""
    if process_set is None or process_set is global_process_set:
        return global_process_set, runtime.get_comm()
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"process_set must be an mpidp.ProcessSet, not {type(process_set).__name__}")
    return process_set, process_set._member()


def _free_all():
    for ps in _created:
        if ps.comm is not None:
            ps.comm.Free()
            ps.comm = None
    _created.clear()
