"""Losses: ``loss = crit(pred, target)`` returns a float; ``crit.backward()`` returns d(loss)/d(pred)."""
from ..backend.xp import get_array_module
from ..errors import MpidpError
from . import functional as F


class _Loss:
    _cache = None

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def _take(self):
        if self._cache is None:
            raise MpidpError(f"{type(self).__name__}.backward was called before the loss was computed; "
                             f"call crit(pred, target) first")
        cache, self._cache = self._cache, None
        return cache


class CrossEntropyLoss(_Loss):
    """Mean cross entropy of logits (..., C) against class ids (...); optional label smoothing."""

    def __init__(self, label_smoothing=0.0, ignore_index=-100):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)

    def forward(self, logits, target):
        """logits (..., C), target (...) integer class ids -> mean loss over non-ignored targets (float)."""
        if target.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss takes integer class ids as target, got dtype {target.dtype}; "
                            f"pass labels as an int array")
        if tuple(logits.shape[:-1]) != tuple(target.shape):
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match; "
                             f"the target must have the logits' shape without the last (class) axis")
        c = logits.shape[-1]
        loss, cache = F.cross_entropy_forward(logits.reshape(-1, c), target.reshape(-1),
                                              self.label_smoothing, self.ignore_index)
        self._cache = (cache, logits.shape, logits.dtype)
        return float(loss)

    def backward(self, grad=1.0):
        """d(loss)/d(logits) (..., C), times ``grad`` (e.g. a loss scale)."""
        cache, shape, dtype = self._take()
        d = F.cross_entropy_backward(cache, self.label_smoothing)
        if grad != 1.0:
            d *= grad
        return d.astype(dtype, copy=False).reshape(shape)


class MSELoss(_Loss):
    """Mean squared error over all elements."""

    def forward(self, pred, target):
        """pred, target (...) of the same shape -> mean((pred - target)^2) (float)."""
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"MSELoss needs pred and target of the same shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        diff = F._up(pred) - get_array_module(pred).asarray(target, dtype=F.acc_dtype(pred.dtype))
        self._cache = (diff, pred.dtype)
        return float((diff * diff).mean())

    def backward(self, grad=1.0):
        """d(loss)/d(pred) = 2 (pred - target) / n, times ``grad``."""
        diff, dtype = self._take()
        return (diff * (2.0 * grad / diff.size)).astype(dtype, copy=False)
