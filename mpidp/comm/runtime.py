"""Process-wide MPI state: init, shutdown, ranks, and what the MPI can do."""
import atexit
import sys
import time

from mpi4py import MPI

from .. import _env, timeline
from ..backend import cuda_aware as _cuda_aware
from ..backend.device import bind_device
from ..errors import NotInitializedError
from . import _abort, stall


class _State:
    """The single runtime-state object; ``None`` fields until ``init()``."""

    def __init__(self):
        self.comm = None          # private duplicate of the user's communicator
        self.local_comm = None    # ranks on this node
        self.cross_comm = None    # ranks with the same local rank, one per node
        self.topology = None      # nodes and channel communicators of the hierarchical allreduce
        self.device = None
        self.cuda_aware = None
        self.cuda_aware_how = ""
        self.finalize_mpi = False


_state = _State()


def init(comm=None):
    """Initialise mpidp over ``comm`` (default COMM_WORLD); idempotent."""
    if _state.comm is not None:
        return
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
        _state.finalize_mpi = True
    base = MPI.COMM_WORLD if comm is None else comm
    _state.comm = base.Dup()  # our traffic never matches the user's own messages
    _state.local_comm = _state.comm.Split_type(MPI.COMM_TYPE_SHARED, key=_state.comm.Get_rank())
    _state.cross_comm = _state.comm.Split(_state.local_comm.Get_rank(), _state.comm.Get_rank())
    from ._hierarchical import Topology  # it imports this module
    _state.topology = Topology(_state.comm, _state.local_comm)
    _state.cuda_aware, _state.cuda_aware_how = _cuda_aware.detect()
    _state.device = bind_device(_state.local_comm.Get_rank())
    stall.start(_state.comm)
    timeline.start()  # MPIDP_TIMELINE=path records every rank; shutdown() writes the merged trace
    if _env.get("MPIDP_ABORT_ON_EXCEPTION"):
        _abort.install(_state.comm)
    atexit.register(_exit_without_shutdown)


def shutdown():
    """Free mpidp's communicators (a collective call); MPI itself is finalised at exit."""
    if _state.comm is None:
        return
    from . import process_set
    if timeline.enabled():
        timeline.save()
    stall.stop()
    process_set._free_all()
    _state.topology.free()
    for c in (_state.cross_comm, _state.local_comm, _state.comm):
        c.Free()
    _state.__init__()


def _exit_without_shutdown():
    """At exit without shutdown(): wait for the peers to exit too, or abort so none hangs."""
    comm = _state.comm
    if comm is None or MPI.Is_finalized():
        return
    stall.stop()
    if comm.Get_size() == 1:
        return
    request = comm.Ibarrier()
    deadline = time.monotonic() + _env.get("MPIDP_EXIT_TIMEOUT_S")
    while not request.Test():
        if time.monotonic() > deadline:
            sys.stderr.write(f"[rank {comm.Get_rank()}] exited without mpidp.shutdown() while other "
                             f"ranks did not exit within MPIDP_EXIT_TIMEOUT_S; aborting the job\n")
            sys.stderr.flush()
            comm.Abort(1)
        time.sleep(0.001)


def get_comm():
    """mpidp's communicator; raises if ``init()`` was not called."""
    if _state.comm is None:
        raise NotInitializedError("mpidp is not initialized: call mpidp.init() first")
    return _state.comm


def is_initialized():
    return _state.comm is not None


def rank():
    """This process's rank in mpidp's communicator."""
    return get_comm().Get_rank()


def size():
    """Number of ranks in mpidp's communicator."""
    return get_comm().Get_size()


def local_rank():
    """Rank among the processes on this node."""
    get_comm()
    return _state.local_comm.Get_rank()


def local_size():
    """Number of processes on this node."""
    get_comm()
    return _state.local_comm.Get_size()


def cross_rank():
    """Index of this node among the nodes (rank in the communicator of equal local ranks)."""
    get_comm()
    return _state.cross_comm.Get_rank()


def cross_size():
    """Number of nodes (size of the communicator of equal local ranks)."""
    get_comm()
    return _state.cross_comm.Get_size()


def topology(comm):
    """The hierarchical allreduce's Topology of ``comm`` when it is mpidp's communicator, else None."""
    return _state.topology if comm is _state.comm else None


def mpi_threads_supported():
    """True when MPI provides THREAD_MULTIPLE."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def cuda_aware(verbose=False):
    """Whether device buffers go to MPI directly; ``verbose=True`` gives (answer, how it was found)."""
    get_comm()
    return (_state.cuda_aware, _state.cuda_aware_how) if verbose else _state.cuda_aware


def device():
    """The CUDA device this rank is bound to, or None on a CPU-only machine."""
    return _state.device
