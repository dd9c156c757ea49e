"""Linear (fully connected) layer."""
import numpy

from .. import functional as F
from .. import init
from ..module import Module
from ..parameter import Parameter


class Linear(Module):
    """y = x W^T + b: x (..., in_features) -> y (..., out_features); W (out, in), b (out,)."""

    def __init__(self, in_features, out_features, bias=True, dtype=numpy.float32, rng=None):
        super().__init__()
        rng = init.as_rng(rng)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(init.fan_in_uniform((out_features, in_features), in_features, rng, dtype))
        self.bias = Parameter(init.fan_in_uniform((out_features,), in_features, rng, dtype)) if bias else None

    def forward(self, x):
        w = self.weight.data
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r} expects input (..., {self.in_features}) but got shape {tuple(x.shape)}; "
                             f"reshape the input or change in_features")
        x = x.astype(w.dtype, copy=False)
        self._save(x)
        return F.linear_forward(x, w, None if self.bias is None else self.bias.data)

    def _backward(self, dy):
        (x,) = self._pop()
        w, b = self.weight, self.bias
        dx, dw, db = F.linear_backward(dy, x, w.data, w.requires_grad, b is not None and b.requires_grad)
        if dw is not None:
            w.accumulate(dw)
        if db is not None:
            b.accumulate(db)
        return dx

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"
