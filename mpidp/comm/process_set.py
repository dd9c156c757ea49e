"""Process sets: collectives over a subset of the ranks, as Horovod's ``hvd.ProcessSet``."""
import numbers

from mpi4py import MPI

from . import check, runtime
from .engine import release

_created = []


class ProcessSet:
    """A sub-communicator over ``ranks`` (ranks of mpidp's communicator), created collectively.

    Every rank of the job must call ``ProcessSet(ranks)`` with the same list.
    """

    def __init__(self, ranks):
        self.ranks = sorted(int(r) for r in ranks)
        self.comm = None
        self.process_set_id = None  # set when registered (created): by init(process_sets=) or add_process_set
        if runtime.is_initialized():  # before init() it waits, as in Horovod, for init(process_sets=[...])
            self._register()

    def _register(self):
        world = runtime.get_comm()
        ranks, n = self.ranks, world.Get_size()
        if not ranks or len(set(ranks)) != len(ranks) or ranks[0] < 0 or ranks[-1] >= n:
            raise ValueError(f"process set ranks {ranks} must be distinct ranks in [0, {n}) and not empty")

        def create():
            check.agree(world, "ProcessSet", "process_set", (("ranks", tuple(ranks)),))
            comm = world.Create(world.Get_group().Incl(ranks))
            if comm != MPI.COMM_NULL:  # its nodes, for the hierarchical collectives (collective over the set)
                from ._hierarchical import Topology
                runtime._set_topologies[id(comm)] = Topology(
                    comm, comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank()))
            return comm

        comm = runtime._in_order(create, f"ProcessSet({ranks})")  # behind the queued collectives
        self.comm = None if comm == MPI.COMM_NULL else comm
        self.process_set_id = _next_id()
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
        if self.process_set_id is None:
            raise ValueError(f"process set {self.ranks} is not registered: pass it to mpidp.init(process_sets=[...]) "
                             f"or mpidp.add_process_set() on every rank")
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
        self.process_set_id = 0

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


def job_rank(root_rank, what):
    """``root_rank`` as an int; TypeError for anything but an integer (1.7 or "1" would have been rank 1)."""
    if not isinstance(root_rank, numbers.Integral):
        raise TypeError(f"{what}: root_rank must be an integer (a rank of the job), not "
                        f"{type(root_rank).__name__} {root_rank!r}")
    return int(root_rank)


def resolve(process_set):
    """The communicator for ``process_set`` (None: all ranks); error on a non-member rank."""
    if process_set is None or process_set is global_process_set:
        return global_process_set, runtime.get_comm()
    if not isinstance(process_set, ProcessSet):
        raise TypeError(f"process_set must be an mpidp.ProcessSet, not {type(process_set).__name__}")
    return process_set, process_set._member()


def _free(comm):
    """Free a set's communicator and its topology's."""
    topo = runtime._set_topologies.pop(id(comm), None)
    if topo is not None:
        topo.free()
        topo.local.Free()
    comm.Free()


def _free_all():
    for ps in _created:
        if ps.comm is not None:
            _free(ps.comm)
        ps.comm, ps.process_set_id = None, None
    _created.clear()


def _next_id():
    return max((ps.process_set_id for ps in _created), default=0) + 1


def add_process_set(process_set):
    """Create a process set from a ProcessSet or a list of ranks (collective: every rank alike); returns it."""
    runtime.get_comm()
    given = isinstance(process_set, ProcessSet)
    ranks = process_set.ranks if given else sorted(int(r) for r in process_set)
    if given and process_set.process_set_id is not None:
        raise ValueError(f"process set {ranks} is already registered (id {process_set.process_set_id})")
    if ranks == global_process_set.ranks or any(other.ranks == ranks for other in _created):
        raise ValueError(f"a process set with ranks {ranks} exists already; use it, or remove it first")
    if not given:
        return ProcessSet(ranks)
    process_set._register()
    return process_set


def remove_process_set(process_set):
    """Free a process set's communicator (collective: every rank alike); False for the global set or
    a set that is not registered."""
    if process_set is global_process_set or process_set not in _created:
        return False
    world = runtime.get_comm()

    def free():  # behind every queued collective, so nothing queued still uses the communicator
        check.agree(world, "remove_process_set", "process_set", (("ranks", tuple(process_set.ranks)),))
        if process_set.comm is not None:
            release(process_set.comm)  # what is queued on the set runs first; its engine ends
            _free(process_set.comm)

    runtime._in_order(free, f"remove_process_set({process_set.ranks})")
    process_set.comm, process_set.process_set_id = None, None
    _created.remove(process_set)
    return True
