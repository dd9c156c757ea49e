"""A DistributedOptimizer averaging 16-bit gradients divides before the sum, as the ShardedOptimizer and
DDP do: the sum of loss-scaled float16 gradients overflowed (an inf, a skipped step) where every rank's
gradient and their average are finite, more often the more ranks."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim
from mpidp.backend import bfloat16


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no overlap"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_average_of_large_half_gradients_stays_finite(rank, size, dtype, overlap):
    dtype = bfloat16 if dtype == "bfloat16" else numpy.dtype(dtype)
    top = float(numpy.finfo(numpy.float16).max) if dtype == numpy.float16 else 3.0e38
    model = nn.Sequential(nn.Linear(4, 3, dtype=dtype))
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.0), model=model, overlap=overlap)
    opt.zero_grad()
    grads = [numpy.full(p.shape, top * (0.5 + 0.1 * r), numpy.float64) for p in model.parameters()
             for r in [rank]]
    for p, g in zip(model.parameters(), grads):
        p.grad[...] = g.astype(dtype)
    opt.synchronize()
    want = top * (0.5 + 0.1 * (size - 1) / 2)  # the mean of 0.5 + 0.1 r over the ranks, times top
    for p in model.parameters():
        got = p.grad.astype(numpy.float64)
        assert numpy.isfinite(got).all(), f"{p.grad.dtype} average overflowed at np={size}"
        numpy.testing.assert_allclose(got, want, rtol=2e-2)
    opt.step()
