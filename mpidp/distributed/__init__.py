"""Data parallelism over the collectives: the distributed optimizer, replica state, SyncBatchNorm."""
from .optimizer import DistributedOptimizer
from .state import broadcast_optimizer_state, broadcast_parameters, check_replicas
from .sync_batchnorm import SyncBatchNorm

__all__ = ["DistributedOptimizer", "SyncBatchNorm", "broadcast_optimizer_state",
           "broadcast_parameters", "check_replicas"]
