"""Elementwise activations: x (...) -> y (...) of the same shape."""
from .. import functional as F
from ..module import Module


class ReLU(Module):
    """max(x, 0)."""

    def forward(self, x):
        y = F.relu(x)
        self._save(y)
        return y

    def _backward(self, dy):
        (y,) = self._pop()
        return dy * (y > 0)


class GELU(Module):
    """Gaussian error linear unit, tanh approximation (PyTorch's approximate='tanh')."""

    def forward(self, x):
        self._save(x)
        return F.gelu(x)

    def _backward(self, dy):
        (x,) = self._pop()
        return F.gelu_backward(dy, x)


class Tanh(Module):
    """tanh(x)."""

    def forward(self, x):
        y = F.tanh(x)
        self._save(y)
        return y

    def _backward(self, dy):
        (y,) = self._pop()
        return dy * (1.0 - y * y)


class Sigmoid(Module):
    """1 / (1 + exp(-x))."""

    def forward(self, x):
        y = F.sigmoid(x)
        self._save(y)
        return y

    def _backward(self, dy):
        (y,) = self._pop()
        return dy * y * (1.0 - y)
