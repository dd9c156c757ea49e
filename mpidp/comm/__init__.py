"""Collectives over MPI for NumPy and CuPy arrays (imports mpi4py: initialises MPI on first import)."""
import faulthandler
import sys

from .. import _env


def _import_mpi():
    """Import (and so initialise) MPI under a C-level watchdog.

    A rank that dies before MPI_Init leaves its peers in MPI_Init for ever (MPICH's
    hydra does not end the job, and MPI_Init holds the GIL, so no Python timer runs):
    after MPIDP_INIT_TIMEOUT_S faulthandler prints where we are stuck and exits.
    """
    timeout = _env.get("MPIDP_INIT_TIMEOUT_S")
    if not timeout or "mpi4py.MPI" in sys.modules:
        return
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        from mpi4py import MPI  # noqa: F401  -- stuck here: a peer rank died before MPI_Init
    finally:
        faulthandler.cancel_dump_traceback_later()


_import_mpi()
from .collectives import (Handle, allgather, allgather_async, allreduce, allreduce_, allreduce_async,
                          allreduce_async_, alltoall, alltoall_async, barrier, broadcast, broadcast_,
                          broadcast_async, broadcast_async_, grouped_allreduce, grouped_allreduce_,
                          grouped_allreduce_async, poll, reducescatter, reducescatter_async,
                          set_check, synchronize)
from .collectives import grouped_allreduce_async_
from .grouped import (grouped_allgather, grouped_allgather_async, grouped_reducescatter,
                      grouped_reducescatter_async)
from .join import join
from .objects import allgather_object, broadcast_object
from .ops import Average, Max, Min, Product, ReduceOp, Sum
from .process_set import ProcessSet, add_process_set, global_process_set, remove_process_set
from .runtime import (cross_rank, cross_size, cuda_aware, get_comm, init, is_initialized, local_rank,
                      local_size, mpi_threads_supported, rank, shutdown, size)
from .runtime import is_homogeneous

__all__ = [n for n in dir() if not n.startswith("_")]
