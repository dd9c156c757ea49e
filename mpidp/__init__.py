"""mpidp: data-parallel training over MPI with NumPy and CuPy replicas.

``import mpidp`` is cheap and never initialises MPI (the launcher relies on
that); the MPI-facing names below load their module on first use.
"""
import importlib

from ._version import __version__
from .errors import (CheckpointError, HostfileError, LaunchError, MismatchError, MpidpError,
                     NotInitializedError, StallError)

# public name -> module that defines it (loaded on first access)
_LAZY = {}
for _module, _names in {
    "mpidp.comm.runtime": ["init", "shutdown", "is_initialized", "rank", "size", "local_rank",
                           "local_size", "cross_rank", "cross_size", "mpi_threads_supported",
                           "cuda_aware", "is_homogeneous"],
    "mpidp.comm.ops": ["Sum", "Average", "Min", "Max", "Product", "ReduceOp"],
    "mpidp.comm.process_set": ["ProcessSet", "global_process_set", "add_process_set", "remove_process_set"],
    "mpidp.comm.collectives": ["allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
                               "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
                               "grouped_allreduce_async_",
                               "allgather", "allgather_async", "broadcast", "broadcast_",
                               "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async",
                               "reducescatter", "reducescatter_async", "barrier", "synchronize",
                               "poll", "Handle"],
    "mpidp.comm.grouped": ["grouped_allgather", "grouped_allgather_async", "grouped_reducescatter",
                           "grouped_reducescatter_async"],
    "mpidp.comm.objects": ["broadcast_object", "allgather_object"],
    "mpidp.comm.join": ["join"],
    "mpidp.timeline": ["start_timeline", "stop_timeline"],
    "mpidp.fusion.compression": ["Compression"],
    "mpidp.distributed.optimizer": ["DistributedOptimizer"],
    "mpidp.distributed.state": ["broadcast_parameters", "broadcast_optimizer_state",
                                "check_replicas"],
    "mpidp.distributed.sharded": ["ShardedOptimizer"],
}.items():
    for _name in _names:
        _LAZY[_name] = _module

_SUBMODULES = ("backend", "comm", "nn", "optim", "fusion", "distributed", "data", "models",
               "checkpoint", "timeline", "amp", "offload", "tune", "launch", "testing")

__all__ = sorted(list(_LAZY) + list(_SUBMODULES) + [
    "__version__", "CheckpointError", "HostfileError", "LaunchError", "MismatchError",
    "MpidpError", "NotInitializedError", "StallError"])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mpidp.{name}")
    raise AttributeError(f"module 'mpidp' has no attribute {name!r}")


def __dir__():
    return __all__
