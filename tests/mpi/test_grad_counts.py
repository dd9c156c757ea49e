"""Gradient-ready counts: a bucket starts only once every gradient in it is complete.

A slow layer in the middle of backward (0.15 s) gives the engine thread time to
run a bucket that started too early, so a wrong count shows as a wrong average.
Every case checks the parameters after one SGD(lr=1) step against a NumPy
reference: start - the average over ranks of what each rank accumulated.
"""
import time

import numpy
import pytest

import mpidp
from mpidp import nn, optim

D, H, C, B = 6, 9, 4, 5
SLOW_S = 0.15


class Slow(nn.Module):
    """Identity whose backward takes ``delay`` seconds and can fail (``fail`` = raise once)."""

    def __init__(self):
        super().__init__()
        self.fail = False
        self.delay = SLOW_S

    def forward(self, x):
        return x

    def _backward(self, dy):
        time.sleep(self.delay)
        if self.fail:
            self.fail = False
            raise RuntimeError("backward failed halfway (on purpose)")
        return dy


class Model(nn.Module):
    """in -> slow -> tied -> tanh -> tied again (one weight, two uses) -> out; ``spare`` is never used."""

    def __init__(self, spare=False):
        super().__init__()
        self.inp = nn.Linear(D, H, dtype=numpy.float64)
        self.tied = nn.Linear(H, H, dtype=numpy.float64)
        self.slow = Slow()
        self.out = nn.Linear(H, C, dtype=numpy.float64)
        if spare:
            self.spare = nn.Linear(2, 2, dtype=numpy.float64)
        rng = numpy.random.default_rng(3)
        for p in self.parameters():
            p.data[...] = rng.standard_normal(p.shape) * 0.3

    def forward(self, x):
        h = numpy.tanh(self.tied(self.slow(self.inp(x))))
        self._save(1 - h * h)
        return self.out(self.tied(h))

    def _backward(self, dy):
        (dtanh,) = self._pop()
        dy = self.tied.backward(self.out.backward(dy))
        return self.inp.backward(self.slow.backward(self.tied.backward(dy * dtanh)))


def batch(rank, k):
    rng = numpy.random.default_rng(100 * rank + k)
    return rng.standard_normal((B, D)), rng.standard_normal((B, C))


def one_pass(model, rank, k, fail=False):
    x, t = batch(rank, k)
    y = model(x)
    model.slow.fail = fail
    model.backward((y - t) / B)


def make(kind, passes=1, spare=False):
    model = Model(spare)
    params = model.parameters()
    if kind == "distributed":
        opt = mpidp.DistributedOptimizer(optim.SGD(params, lr=1.0), model=model,
                                         backward_passes_per_step=passes, fusion_threshold_bytes=1 << 20)
    else:
        opt = mpidp.ShardedOptimizer(optim.SGD(params, lr=1.0), model=model, stage=int(kind[-1]),
                                     backward_passes_per_step=passes, bucket_bytes=1 << 20)
    return model, opt


def local_grads(rank, ks, spare):
    """What rank ``rank`` accumulates over passes ``ks``, with a plain model (no engine: no need to be slow)."""
    model = Model(spare)
    model.slow.delay = 0
    model.zero_grad()
    for k in ks:
        one_pass(model, rank, k)
    return {n: p.grad.copy() for n, p in model.named_parameters()}


def check(model, size, ks):
    spare = hasattr(model, "spare")
    start = {n: p.data.copy() for n, p in Model(spare).named_parameters()}
    grads = [local_grads(r, ks, spare) for r in range(size)]
    for n, p in model.named_parameters():
        want = start[n] - sum(g[n] for g in grads) / size
        numpy.testing.assert_allclose(p.data, want, rtol=0, atol=1e-12, err_msg=n)
    mpidp.check_replicas(model)


KINDS = ["distributed", "sharded1", "sharded2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spare", [False, True])  # with an unused parameter in the bucket
def test_no_sync_then_a_pass(rank, size, kind, spare):
    model, opt = make(kind, spare=spare)
    opt.zero_grad()
    with opt.no_sync():
        one_pass(model, rank, 0)
    one_pass(model, rank, 1)
    opt.step()
    check(model, size, [0, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_accumulation_with_no_sync(rank, size, kind):
    model, opt = make(kind, passes=2)
    opt.zero_grad()
    with opt.no_sync():
        one_pass(model, rank, 0)
    one_pass(model, rank, 1)
    one_pass(model, rank, 2)
    opt.step()
    check(model, size, [0, 1, 2])


@pytest.mark.parametrize("kind", KINDS)
def test_backward_that_raises_halfway_then_zero_grad(rank, size, kind):
    model, opt = make(kind)
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="on purpose"):
        one_pass(model, rank, 0, fail=True)
    model.clear_cache()
    opt.zero_grad()
    one_pass(model, rank, 1)
    opt.step()
    check(model, size, [1])


@pytest.mark.parametrize("kind", KINDS)
def test_zero_grad_after_an_unstepped_pass(rank, size, kind):
    """A pass whose buckets went out, then zero_grad: it is forgotten, the next pass counts alone."""
    model, opt = make(kind)
    opt.zero_grad()
    one_pass(model, rank, 0)
    opt.zero_grad()
    one_pass(model, rank, 1)
    opt.step()
    check(model, size, [1])


@pytest.mark.parametrize("kind", KINDS)
def test_several_steps(rank, size, kind):
    model, opt = make(kind, passes=2)
    for step in range(3):
        opt.zero_grad()
        one_pass(model, rank, 0)
        one_pass(model, rank, 1)
        opt.step()
    start = {n: p.data.copy() for n, p in Model().named_parameters()}
    assert any((p.data != start[n]).any() for n, p in model.named_parameters())
    mpidp.check_replicas(model)


def test_a_pass_too_many_is_an_error(rank, size):
    """A gradient produced again while its bucket is being averaged would change it under MPI."""
    model, opt = make("distributed")
    opt.zero_grad()
    one_pass(model, rank, 0)
    with pytest.raises(mpidp.MpidpError, match="computed again"):
        one_pass(model, rank, 1)
    model.clear_cache()
    opt.zero_grad()
    one_pass(model, rank, 2)
    opt.step()
    check(model, size, [2])
