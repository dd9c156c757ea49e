"""Layer families, one module each."""
from .activation import GELU, ReLU, Sigmoid, Tanh
from .attention import MultiHeadAttention
from .checkpoint import Checkpoint
from .container import Flatten, Identity, ModuleList, Reshape, Residual, Sequential
from .conv import Conv2d
from .dropout import Dropout
from .embedding import Embedding, PositionalEmbedding
from .linear import Linear
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm
from .pooling import AvgPool2d, MaxPool2d

__all__ = ["AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Checkpoint", "Conv2d", "Dropout", "Embedding",
           "Flatten", "GELU", "Identity", "LayerNorm", "Linear", "MaxPool2d", "ModuleList",
           "MultiHeadAttention", "PositionalEmbedding", "ReLU", "Reshape", "Residual", "Sequential",
           "Sigmoid", "Tanh"]
