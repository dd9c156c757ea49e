"""Token and learned positional embeddings."""
import numpy

from .. import functional as F
from .. import init
from ..module import Module
from ..parameter import Parameter


class Embedding(Module):
    """Row lookup: integer ids (...) -> vectors (..., embedding_dim); weight (num_embeddings, dim)."""

    def __init__(self, num_embeddings, embedding_dim, dtype=numpy.float32, rng=None, std=1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim), std, init.as_rng(rng), dtype))

    def forward(self, ids):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{self!r} takes integer ids, got dtype {ids.dtype}; pass token ids as an int array")
        self._save(ids)
        return self.weight.data[ids]

    def _backward(self, dy):
        (ids,) = self._pop()
        w = self.weight
        if w.requires_grad and w.grad is not None:
            F.scatter_add_rows(w.grad, ids, dy)
        return None  # ids have no gradient

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class PositionalEmbedding(Module):
    """Adds a learned vector per position: x (B, T, D) -> x + weight[:T]; weight (max_len, D)."""

    def __init__(self, max_len, dim, dtype=numpy.float32, rng=None, std=0.02):
        super().__init__()
        self.max_len, self.dim = int(max_len), int(dim)
        self.weight = Parameter(init.normal((max_len, dim), std, init.as_rng(rng), dtype))

    def forward(self, x):
        if x.ndim != 3 or x.shape[1] > self.max_len or x.shape[2] != self.dim:
            raise ValueError(f"{self!r} expects input (B, T <= {self.max_len}, {self.dim}) but got shape "
                             f"{tuple(x.shape)}; use shorter sequences or a larger max_len")
        self._save(x.shape[1])
        return x + self.weight.data[:x.shape[1]]

    def _backward(self, dy):
        (t,) = self._pop()
        w = self.weight
        if w.requires_grad and w.grad is not None:
            w.grad[:t] += dy.sum(0)
        return dy

    def extra_repr(self):
        return f"{self.max_len}, {self.dim}"
