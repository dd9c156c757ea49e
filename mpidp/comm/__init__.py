"""Collectives over MPI for NumPy and CuPy arrays (imports mpi4py: initialises MPI on first import)."""
from .collectives import (Handle, allgather, allgather_async, allreduce, allreduce_, allreduce_async,
                          allreduce_async_, alltoall, alltoall_async, barrier, broadcast, broadcast_,
                          broadcast_async, broadcast_async_, grouped_allreduce, grouped_allreduce_,
                          grouped_allreduce_async, poll, reducescatter, reducescatter_async,
                          set_check, synchronize)
from .objects import allgather_object, broadcast_object
from .ops import Average, Max, Min, Product, ReduceOp, Sum
from .process_set import ProcessSet, global_process_set
from .runtime import (cross_rank, cross_size, cuda_aware, get_comm, init, is_initialized, local_rank,
                      local_size, mpi_threads_supported, rank, shutdown, size)

__all__ = [n for n in dir() if not n.startswith("_")]
