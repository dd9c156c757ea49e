"""Process-wide MPI state: init, shutdown, ranks, and what the MPI can do."""
import atexit
import functools
import os
import sys
import time

from mpi4py import MPI

from .. import _env, timeline
from ..backend import cuda_aware as _cuda_aware
from ..backend.device import bind_device
from ..errors import MismatchError, MpidpError, NotInitializedError
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
        self.homogeneous = None   # every node runs the same number of ranks
        self.pid = None           # the process that called init(): a forked child is not a rank


_state = _State()
_LEVELS = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
           MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
_exit_hook = False
_rank_pid = None  # the process that called init(), kept after shutdown(): MPI stays initialised


def init(comm=None, process_sets=None):
    """Initialise mpidp over ``comm`` (default COMM_WORLD); idempotent.

    ``process_sets``: ProcessSets (or rank lists) to create now, as Horovod's ``init``.
    """
    global _exit_hook, _rank_pid
    if _state.comm is not None:
        _add_process_sets(process_sets)
        return
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
        _state.finalize_mpi = True
    level = MPI.Query_thread()
    if level < MPI.THREAD_MULTIPLE:  # the engine thread calls MPI while the caller computes
        raise MpidpError(f"MPI was initialised with thread level {_LEVELS.get(level, level)}, but mpidp "
                         f"calls MPI from its engine thread and needs multiple; drop "
                         f"mpi4py.rc.thread_level = {_LEVELS.get(level, level)!r} (or call "
                         f"MPI.Init_thread(MPI.THREAD_MULTIPLE)), with an MPI library built for it")
    base = MPI.COMM_WORLD if comm is None else comm
    _state.comm = base.Dup()  # our traffic never matches the user's own messages
    _state.local_comm = _state.comm.Split_type(MPI.COMM_TYPE_SHARED, key=_state.comm.Get_rank())
    _state.cross_comm = _state.comm.Split(_state.local_comm.Get_rank(), _state.comm.Get_rank())
    from . import check
    rows = _state.comm.allgather((_state.local_comm.Get_size(), check.is_enabled()))
    if len({on for _, on in rows}) > 1:  # a rank without the check meets the others' in another call: a hang
        error = check.mismatch_error("init", [("init", (("MPIDP_CHECK", on),)) for _, on in rows], _state.comm,
                                     "set MPIDP_CHECK alike on every rank (or unset it everywhere)")
        for c in (_state.cross_comm, _state.local_comm, _state.comm):
            c.Free()
        _state.comm = _state.local_comm = _state.cross_comm = None
        raise error
    _state.homogeneous = len({size for size, _ in rows}) == 1
    from ._hierarchical import Topology  # it imports this module
    _state.topology = Topology(_state.comm, _state.local_comm)
    _state.cuda_aware, _state.cuda_aware_how = _cuda_aware.detect()
    _state.device = bind_device(_state.local_comm.Get_rank())
    _state.pid = _rank_pid = os.getpid()
    stall.start(_state.comm)
    timeline.start()  # MPIDP_TIMELINE=path records every rank; shutdown() writes the merged trace
    if _env.get("MPIDP_ABORT_ON_EXCEPTION"):
        _abort.install(_state.comm)
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_at_exit)
        os.register_at_fork(after_in_child=_forked)
    _add_process_sets(process_sets)


def _end_checks(kind):
    """Queue the check that every rank ends here (``kind``: shutdown or exit) on mpidp's communicator
    and on each process set this rank is in, each behind its own queue; returns their handles.

    A peer still inside a collective that this rank left (one step early, or a shutdown() on some
    ranks only) meets the check there and gets a MismatchError naming that collective at once,
    not a wait for the stall bound. Skipped with the agreement check off.
    """
    from . import check, process_set
    from .engine import engine_for
    if not check.is_enabled():
        return []
    handles = []
    for comm in [_state.comm] + [ps.comm for ps in process_set._created if ps.comm is not None]:
        if comm.Get_size() > 1:
            eng = engine_for(comm)
            seq = eng.started()
            signature = (("collective", kind), ("process set", eng.progress.label), ("name", kind))
            # unnumbered (0): the end meets the peers' end whatever each rank did before
            job = (functools.partial(_exit_check, comm, signature) if kind == "exit" else
                   functools.partial(check.compare, comm, kind, kind, signature, 0))
            handles.append(eng.submit(job, f"{kind} check", seq))
    return handles


def _exit_check(comm, signature):
    """The exit's check, repeated until every rank exits: each peer still inside a collective gets
    a MismatchError (this rank says so once), and once they exit too the check passes; the exit
    deadline bounds it."""
    from . import check
    reported = False
    while True:
        try:
            return check.compare(comm, "exit", "exit", signature, 0)
        except MismatchError as exc:
            if not reported:
                reported = True
                sys.stderr.write(f"[rank {_state.comm.Get_rank()}] exited without mpidp.shutdown() while other "
                                 f"ranks were inside a collective: {exc}\n")
                sys.stderr.flush()


def _in_order(fn, what):
    """Run ``fn`` (MPI calls on mpidp's communicators) behind every collective queued before it."""
    from .engine import engine
    return engine.run(fn, what, stall.started())


def shutdown():
    """Finish the collectives still in flight, then free mpidp's communicators (a collective call);
    MPI itself is finalised at exit. ``init()`` may be called again afterwards."""
    if _state.comm is None:
        return
    if os.getpid() != _state.pid:  # a forked child holds a copy of the parent's state: drop it only
        _state.__init__()
        return
    from . import process_set
    checks = _end_checks("shutdown")  # behind the collectives in flight, which complete first
    while checks:  # each on its own communicator's queue: the first MismatchError is raised here
        for h in [h for h in checks if h.done()]:
            checks.remove(h)
            h.wait()
        time.sleep(0.001)
    if timeline.enabled():
        timeline.save()
    from .engine import stop_all
    stop_all()  # every communicator's queue runs out and its engine thread ends before any free
    stall.stop()
    _abort.uninstall()

    def free():
        process_set._free_all()
        _state.topology.free()
        for c in (_state.cross_comm, _state.local_comm, _state.comm):
            c.Free()

    _in_order(free, "shutdown")
    _state.__init__()


_child_exit_code = None


def _forked():
    """In a child forked from a rank: remember sys.exit's code (see _at_exit)."""
    real_exit = sys.exit

    def exit(code=None):
        global _child_exit_code
        _child_exit_code = code
        real_exit(code)

    sys.exit = exit


def _at_exit():
    if MPI.Is_finalized():
        return
    if os.getpid() != _rank_pid:  # even after shutdown(): MPI is still initialised in the parent
        _leave_child()
    if _state.comm is not None:
        _exit_without_shutdown()


def _leave_child():
    """A forked child must not finalise MPI (that speaks to the launcher for the parent, whose job
    then fails): end the process here with its exit code, as multiprocessing's children do."""
    code = _child_exit_code
    if getattr(sys, "last_value", None) is not None:  # an uncaught exception (already printed)
        code = 1
    code = 0 if code is None else code if isinstance(code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


def _exit_without_shutdown():
    """At exit without shutdown(): finish what is in flight, then wait for the peers to exit too,
    or abort so none hangs (both within MPIDP_EXIT_TIMEOUT_S)."""
    from .engine import engine, engines
    comm = _state.comm
    deadline = time.monotonic() + _env.get("MPIDP_EXIT_TIMEOUT_S")

    def barrier():
        if comm.Get_size() == 1:
            return
        request = comm.Ibarrier()
        while not request.Test():
            if time.monotonic() > deadline:
                _give_up(comm, "did not exit")
            time.sleep(0.001)

    _end_checks("exit")
    others = [e for e in engines() if e is not engine]  # process sets' queues finish too
    # the engine thread runs the queue and then the barrier (MPI from one thread, in order)
    done = engine.submit(barrier, "exit barrier", stall.started())
    while not (done.done() and all(e.idle() for e in others)):
        if time.monotonic() > deadline:
            _give_up(comm, "did not finish the collectives in flight")
        time.sleep(0.001)
    stall.stop()
    done.wait()


def _give_up(comm, why):
    sys.stderr.write(f"[rank {comm.Get_rank()}] exited without mpidp.shutdown() while other ranks {why} "
                     f"within MPIDP_EXIT_TIMEOUT_S; aborting the job\n")
    sys.stderr.flush()
    comm.Abort(1)


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


_set_topologies = {}  # id(comm) -> the Topology of a process set's communicator (process_set.py keeps it)


def topology(comm):
    """The Topology of ``comm`` (mpidp's communicator or a process set's) for the hierarchical
    collectives, else None."""
    if comm is _state.comm:
        return _state.topology
    topo = _set_topologies.get(id(comm))
    return topo if topo is not None and topo.comm is comm else None


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


def is_homogeneous():
    """True when every node runs the same number of ranks."""
    get_comm()
    return _state.homogeneous


def _add_process_sets(process_sets):
    if process_sets is None or process_sets == "dynamic":  # Horovod's "dynamic": always so here
        return
    from .process_set import ProcessSet, add_process_set
    for ps in process_sets:
        if not (isinstance(ps, ProcessSet) and ps.process_set_id is not None):  # created after init
            add_process_set(ps)
