"""Layers with explicit backward, losses, initialisers and gradient-ready hooks. Never imports MPI."""
import importlib

from . import functional, init
from .init import manual_seed
from .layers import (GELU, AvgPool2d, BatchNorm1d, BatchNorm2d, Checkpoint, Conv2d, Dropout, Embedding,
                     Flatten, Identity, LayerNorm, Linear, MaxPool2d, ModuleList, MultiHeadAttention,
                     PositionalEmbedding, ReLU, Reshape, Residual, Sequential, Sigmoid, Tanh)
from .loss import CrossEntropyLoss, MSELoss
from .module import Module, is_grad_enabled, no_grad
from .parameter import Parameter, RemovableHandle

__all__ = ["AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Checkpoint", "Conv2d", "CrossEntropyLoss", "Dropout",
           "Embedding", "Flatten", "GELU", "Identity", "LayerNorm", "Linear", "MSELoss", "MaxPool2d", "Module",
           "ModuleList", "MultiHeadAttention", "Parameter", "PositionalEmbedding", "ReLU", "RemovableHandle",
           "Reshape", "Residual", "Sequential", "Sigmoid", "SyncBatchNorm", "Tanh", "functional", "init",
           "is_grad_enabled", "manual_seed", "no_grad"]


def __getattr__(name):
    # SyncBatchNorm needs MPI, so it lives in mpidp.distributed and loads only when asked for
    if name == "SyncBatchNorm":
        return importlib.import_module("mpidp.distributed.sync_batchnorm").SyncBatchNorm
    raise AttributeError(f"module 'mpidp.nn' has no attribute {name!r}")
