"""End the whole job when one rank fails, instead of leaving the others hanging in a collective.

The hooks are installed once and follow the communicator of the latest ``init()``
(``install`` again after a re-init; ``uninstall`` at shutdown). In a process forked
from a rank they step aside: aborting there would kill the parent's job.
"""
import os
import signal
import sys
import threading
import traceback

_comm = None     # the communicator to abort; None: hooks pass through
_pid = None      # the process that installed them (not a forked child)
_code = 1
_hooked = False

# MPI_Abort takes MPICH's lock, which another thread may hold for ever inside a blocking call to
# a peer that cannot answer (a cut link); the aborting thread then spins holding the GIL, so no
# Python timer can run. A SIGALRM left at its default action ends the process in the kernel, and
# mpiexec, seeing a rank gone, ends the job.
ABORT_GRACE_S = 3.0


def abort(comm, code):
    """MPI_Abort ``comm`` with ``code``; should that hang, SIGALRM ends this process after ABORT_GRACE_S."""
    if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):  # a program's own handler stays
        signal.setitimer(signal.ITIMER_REAL, ABORT_GRACE_S)
    comm.Abort(code)


def _abort(comm, code):
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized():
        abort(comm, code)


def _report(comm, exc_type, exc, tb, where):
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    prefix = f"[rank {comm.Get_rank()}/{comm.Get_size()}] "
    sys.stderr.write(f"{prefix}uncaught exception{where}; aborting the job\n")
    sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
    sys.stderr.flush()
    sys.stdout.flush()


def _active():
    """The communicator to abort, or None (not installed, shut down, one rank, or a forked child)."""
    comm = _comm
    if comm is None or os.getpid() != _pid or comm.Get_size() == 1:
        return None
    return comm


def install(comm, code=1):
    """Print a rank-prefixed traceback and MPI_Abort ``comm`` on any uncaught exception (main thread or not)."""
    global _comm, _pid, _code, _hooked
    _comm, _pid, _code = comm, os.getpid(), code
    if _hooked:
        return
    _hooked = True
    prev_hook, prev_thread_hook = sys.excepthook, threading.excepthook

    def hook(exc_type, exc, tb):
        comm = _active()
        if comm is None:
            return prev_hook(exc_type, exc, tb)
        try:
            _report(comm, exc_type, exc, tb, "")
        finally:
            _abort(comm, _code)

    def thread_hook(args):
        comm = _active()
        if comm is None:
            return prev_thread_hook(args)
        try:
            _report(comm, args.exc_type, args.exc_value, args.exc_traceback,
                    f" in thread {args.thread.name if args.thread else '?'}")
        finally:
            _abort(comm, _code)

    sys.excepthook = hook
    threading.excepthook = thread_hook


def uninstall():
    """Stop aborting (at shutdown: the communicator is about to be freed)."""
    global _comm
    _comm = None
