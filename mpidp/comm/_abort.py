"""End the whole job when one rank fails, instead of leaving the others hanging in a collective."""
import sys
import threading
import traceback

_installed = False


def _abort(comm, code):
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized():
        comm.Abort(code)


def _report(comm, exc_type, exc, tb, where):
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    prefix = f"[rank {comm.Get_rank()}/{comm.Get_size()}] "
    sys.stderr.write(f"{prefix}uncaught exception{where}; aborting the job\n")
    sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
    sys.stderr.flush()
    sys.stdout.flush()


def install(comm, code=1):
    """Print a rank-prefixed traceback and MPI_Abort on any uncaught exception (main thread or not)."""
    global _installed
    if _installed or comm.Get_size() == 1:
        return
    _installed = True
    prev_hook, prev_thread_hook = sys.excepthook, threading.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt) and comm.Get_size() == 1:
            return prev_hook(exc_type, exc, tb)
        try:
            _report(comm, exc_type, exc, tb, "")
        finally:
            _abort(comm, code)

    def thread_hook(args):
        try:
            _report(comm, args.exc_type, args.exc_value, args.exc_traceback,
                    f" in thread {args.thread.name if args.thread else '?'}")
        finally:
            _abort(comm, code)

    sys.excepthook = hook
    threading.excepthook = thread_hook
