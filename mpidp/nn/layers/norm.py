"""LayerNorm and BatchNorm1d/2d (batch statistics through an overridable reducer for SyncBatchNorm)."""
import numpy

from ...backend.xp import get_array_module
from .. import functional as F
from .. import init
from ..module import Module, _mode
from ..parameter import Parameter


class LayerNorm(Module):
    """Normalise over the last axis: x (..., D) -> y (..., D); weight, bias (D,)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype=numpy.float32):
        super().__init__()
        self.dim, self.eps = int(normalized_shape), float(eps)
        self.weight = Parameter(init.ones((self.dim,), dtype)) if elementwise_affine else None
        self.bias = Parameter(init.zeros((self.dim,), dtype)) if elementwise_affine else None

    def forward(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"{self!r} expects input (..., {self.dim}) but got shape {tuple(x.shape)}")
        gamma = 1.0 if self.weight is None else self.weight.data
        beta = 0.0 if self.bias is None else self.bias.data
        y, xhat, inv = F.layernorm_forward(x, gamma, beta, self.eps)
        self._save(xhat, inv)
        return y

    def _backward(self, dy):
        xhat, inv = self._pop()
        gamma = 1.0 if self.weight is None else self.weight.data
        dx, dgamma, dbeta = F.layernorm_backward(dy, xhat, inv, gamma)
        if self.weight is not None:
            self.weight.accumulate(dgamma)
            self.bias.accumulate(dbeta)
        return dx

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class _BatchNorm(Module):
    _ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=numpy.float32):
        super().__init__()
        c = self.num_features = int(num_features)
        self.eps, self.momentum, self.track_running_stats = float(eps), float(momentum), bool(track_running_stats)
        self.weight = Parameter(init.ones((c,), dtype)) if affine else None
        self.bias = Parameter(init.zeros((c,), dtype)) if affine else None
        if self.track_running_stats:
            self.register_buffer("running_mean", init.zeros((c,), dtype))
            self.register_buffer("running_var", init.ones((c,), dtype))
            self.register_buffer("num_batches_tracked", numpy.zeros((), dtype=numpy.int64))

    def _reduce_sums(self, sums):
        """Turn per-channel local sums into the sums the statistics use (identity: local batch)."""
        return sums

    def _layout(self, x):
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            raise ValueError(f"{self!r} expects input of {' or '.join(map(str, self._ndims))} dims with "
                             f"{self.num_features} channels on axis 1, got shape {tuple(x.shape)}")
        axes = (0,) + tuple(range(2, x.ndim))
        return axes, (1, -1) + (1,) * (x.ndim - 2)

    def forward(self, x):
        xp = get_array_module(x)
        axes, shape = self._layout(x)
        z = F._up(x)
        batch_stats = self.training or not self.track_running_stats
        if batch_stats:
            count = xp.full((1,), x.size // self.num_features, dtype=z.dtype)
            s, ss, count = self._reduce_sums([z.sum(axes), (z * z).sum(axes), count])
            mean = s / count
            var = xp.maximum(ss / count - mean * mean, 0.0)
            if self.track_running_stats and not _mode.recomputing:
                m = self.momentum
                self.running_mean *= 1.0 - m
                self.running_mean += m * mean
                self.running_var *= 1.0 - m
                self.running_var += (m * var) * (count / xp.maximum(count - 1.0, 1.0))
                self.num_batches_tracked += 1
        else:
            mean, var, count = F._up(self.running_mean), F._up(self.running_var), None
        inv = 1.0 / xp.sqrt(var + self.eps)
        xhat = (z - mean.reshape(shape)) * inv.reshape(shape)
        self._save(xhat, inv, count)
        y = xhat if self.weight is None else xhat * self.weight.data.reshape(shape) + self.bias.data.reshape(shape)
        return y.astype(x.dtype, copy=False)

    def _backward(self, dy):
        xhat, inv, count = self._pop()
        axes, shape = self._layout(dy)
        g = F._up(dy)
        sum_dy, sum_dy_xhat = g.sum(axes), (g * xhat).sum(axes)
        gamma = 1.0
        if self.weight is not None:
            self.weight.accumulate(sum_dy_xhat)
            self.bias.accumulate(sum_dy)
            gamma = F._up(self.weight.data).reshape(shape)
        scale = gamma * inv.reshape(shape)
        if count is None:  # running statistics: an affine map
            return (g * scale).astype(dy.dtype, copy=False)
        sum_dy, sum_dy_xhat = self._reduce_sums([sum_dy, sum_dy_xhat])
        dx = scale * (g - (sum_dy / count).reshape(shape) - xhat * (sum_dy_xhat / count).reshape(shape))
        return dx.astype(dy.dtype, copy=False)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of x (N, C) or (N, C, L) per channel C."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of x (N, C, H, W) per channel C."""

    _ndims = (4,)
