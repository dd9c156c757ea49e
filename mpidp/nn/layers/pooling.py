"""Max and average 2-D pooling (NCHW)."""
from .. import functional as F
from ..module import Module


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        k = int(kernel_size)
        s = k if stride is None else int(stride)
        if k < 1 or s < 1 or not 0 <= int(padding) <= k // 2:
            raise ValueError(f"{type(self).__name__} needs kernel_size >= 1, stride >= 1 and "
                             f"0 <= padding <= kernel_size // 2, got {kernel_size}, {stride}, {padding}")
        self.kernel_size, self.stride, self.padding = k, s, int(padding)

    def _check(self, x):
        if x.ndim != 4:
            raise ValueError(f"{self!r} expects input (N, C, H, W) but got shape {tuple(x.shape)}")

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """x (N, C, H, W) -> (N, C, OH, OW), the maximum of each window."""

    def forward(self, x):
        self._check(x)
        y, idx = F.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)
        self._save(idx, x.shape)
        return y

    def _backward(self, dy):
        idx, shape = self._pop()
        return F.maxpool2d_backward(dy, idx, shape, self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    """x (N, C, H, W) -> (N, C, OH, OW), the mean of each window."""

    def forward(self, x):
        self._check(x)
        self._save(x.shape)
        return F.avgpool2d_forward(x, self.kernel_size, self.stride, self.padding)

    def _backward(self, dy):
        (shape,) = self._pop()
        return F.avgpool2d_backward(dy, shape, self.kernel_size, self.stride, self.padding)
