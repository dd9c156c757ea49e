"""Offload: a pinned-host (or disk) tier for large parameters, streamed through a device budget. No MPI here."""
from .disk import DiskTier
from .manager import OffloadBudgetError, OffloadManager, OffloadOptimizer

__all__ = ["DiskTier", "OffloadBudgetError", "OffloadManager", "OffloadOptimizer"]
