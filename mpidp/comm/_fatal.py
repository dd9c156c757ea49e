"""A collective that fails on one rank after the ranks agreed to run it ends the whole job.

Its peers are already inside MPI waiting for this rank's messages, and no
error can reach them: raising here would leave them hanging for ever. So the
rank prints its traceback and calls MPI_Abort on mpidp's main communicator.
On a communicator of one rank nobody waits, and the error is raised as usual.
"""
import sys
import traceback


def after_agreement(comm, what, exc):
    """End the job for ``exc`` raised while running ``what`` on ``comm`` (re-raise it if alone)."""
    if comm.Get_size() == 1:
        raise exc
    from . import runtime
    world = runtime.get_comm()
    prefix = f"[rank {world.Get_rank()}/{world.Get_size()}] "
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{prefix}{what} failed on this rank after the ranks had agreed to run it; its peers "
                     f"would wait for it for ever, so the job ends now\n")
    sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
    sys.stderr.flush()
    sys.stdout.flush()
    world.Abort(1)
