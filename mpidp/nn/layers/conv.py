"""2-D convolution (NCHW) by im2col and one matrix product."""
import numpy

from .. import functional as F
from .. import init
from ..module import Module
from ..parameter import Parameter


def _pair(k, what):
    k = (k, k) if isinstance(k, int) else tuple(k)
    if len(k) != 2 or min(k) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of them, got {k!r}")
    return k


class Conv2d(Module):
    """x (N, C_in, H, W) -> y (N, C_out, OH, OW); W (C_out, C_in, KH, KW), b (C_out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=numpy.float32, rng=None):
        super().__init__()
        if int(stride) < 1 or int(padding) < 0:
            raise ValueError(f"Conv2d needs stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
        rng = init.as_rng(rng)
        kh, kw = _pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = (kh, kw), int(stride), int(padding)
        fan_in = in_channels * kh * kw
        self.weight = Parameter(init.fan_in_uniform((out_channels, in_channels, kh, kw), fan_in, rng, dtype))
        self.bias = Parameter(init.fan_in_uniform((out_channels,), fan_in, rng, dtype)) if bias else None

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self!r} expects input (N, {self.in_channels}, H, W) but got shape "
                             f"{tuple(x.shape)}; reshape the input to NCHW")
        w = self.weight.data
        x = x.astype(w.dtype, copy=False)
        y, cols = F.conv2d_forward(x, w, None if self.bias is None else self.bias.data, self.stride, self.padding)
        self._save(cols, x.shape)
        return y

    def _backward(self, dy):
        cols, x_shape = self._pop()
        w, b = self.weight, self.bias
        dx, dw, db = F.conv2d_backward(dy, cols, x_shape, w.data, self.stride, self.padding,
                                       w.requires_grad, b is not None and b.requires_grad)
        if dw is not None:
            w.accumulate(dw)
        if db is not None:
            b.accumulate(db)
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")
