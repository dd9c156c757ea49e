"""Horovod's optimizer-side names: broadcasts from ranks that start apart, skip_synchronize,
set_backward_passes_per_step."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim

D, H, C, B = 5, 6, 3, 4


def build(seed):
    """A model whose parameters and BatchNorm buffers depend on ``seed``: ranks start apart."""
    model = nn.Sequential(nn.Linear(D, H, dtype=numpy.float64), nn.BatchNorm1d(H, dtype=numpy.float64),
                          nn.Tanh(), nn.Linear(H, C, dtype=numpy.float64))
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    for _, b in model.named_buffers():
        b[...] = rng.standard_normal(b.shape) if b.ndim else b
    return model


def trained(seed, steps, order=1):
    """Model and Adam after ``steps`` local steps on seed's data, lr and betas seed's too (no MPI)."""
    model = build(seed)
    params = list(model.parameters())[::order]
    opt = optim.Adam(params, lr=0.01 * (seed + 1), betas=(0.9 - 0.01 * seed, 0.999))
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng(100 + seed)
    for _ in range(steps):
        model.zero_grad()
        crit(model(rng.standard_normal((B, D))), rng.integers(0, C, B))
        model.backward(crit.backward())
        opt.step()
    return model, opt


def same_arrays(got, want):
    for (name, a), (_, b) in zip(got, want):
        numpy.testing.assert_array_equal(a, b, err_msg=name)


def arrays(model):
    return [(n, p.data) for n, p in model.named_parameters()] + list(model.named_buffers())


def test_broadcast_parameters_from_every_root(rank, size):
    for root in range(size):
        model = build(seed=rank)  # every rank starts from its own values
        if size > 1:
            assert not numpy.array_equal(model[0].weight.data, build(seed=(rank + 1) % size)[0].weight.data)
        mpidp.broadcast_parameters(model, root_rank=root)
        same_arrays(arrays(model), arrays(build(seed=root)))
        mpidp.check_replicas(model)
        state = {n: a.copy() for n, a in arrays(build(seed=rank + 7))}  # a state dict works too
        mpidp.broadcast_parameters(state, root_rank=root)
        same_arrays(sorted(state.items()), sorted(arrays(build(seed=root + 7))))


def test_broadcast_optimizer_state_from_ranks_that_trained_differently(rank, size):
    for root in range(size):
        model, opt = trained(seed=rank, steps=rank)  # rank 0 never stepped: no state at all yet
        dist = mpidp.DistributedOptimizer(opt, model=model)
        mpidp.broadcast_parameters(model, root_rank=root)
        mpidp.broadcast_optimizer_state(dist, root_rank=root)
        ref_model, ref = trained(seed=root, steps=root)
        ref.init_state()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert tuple(opt.param_groups[0]["betas"]) == tuple(ref.param_groups[0]["betas"])
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert opt.state[p]["step"] == ref.state[q]["step"] == root
            for key in ("exp_avg", "exp_avg_sq"):
                numpy.testing.assert_array_equal(opt.state[p][key], ref.state[q][key], err_msg=key)
        dist.close()


@pytest.mark.mpi(min_size=2)
def test_broadcast_optimizer_state_by_name_with_the_model(rank, size):
    """Odd ranks list the parameters backwards: by position the moments would land on the wrong
    parameters; with model= they are matched by name."""
    order = -1 if rank % 2 else 1
    model, opt = trained(seed=rank, steps=1 + rank, order=order)
    mpidp.broadcast_optimizer_state(opt, root_rank=0, model=model)
    ref_model, ref = trained(seed=0, steps=1)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        numpy.testing.assert_array_equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], err_msg=name)
    other = build(seed=0)
    with pytest.raises(ValueError, match="not parameters of the model"):
        mpidp.broadcast_optimizer_state(opt, root_rank=0, model=other)


def grads_step(model, rank, k=0):
    crit = nn.CrossEntropyLoss()
    rng = numpy.random.default_rng(1000 * rank + k)
    crit(model(rng.standard_normal((B, D))), rng.integers(0, C, B))
    model.backward(crit.backward())


def local_grads(rank, passes=1):
    model = build(seed=0)
    model.zero_grad()
    for k in range(passes):
        grads_step(model, rank, k)
    return [p.grad.copy() for p in model.parameters()]


def test_skip_synchronize_after_clipping(rank, size):
    model = build(seed=0)
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.5), model=model)
    before = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    grads_step(model, rank)
    opt.synchronize()
    for p in model.parameters():
        p.grad *= 0.25  # the clipping a Horovod script does between synchronize() and step()
    with opt.skip_synchronize():
        opt.step()
    mean = [numpy.mean([local_grads(r)[i] for r in range(size)], axis=0) for i in range(len(before))]
    for p, b, g in zip(model.parameters(), before, mean):
        numpy.testing.assert_allclose(p.data, b - 0.5 * 0.25 * g, rtol=0, atol=1e-12)
    opt.zero_grad()
    grads_step(model, rank)
    with pytest.raises(mpidp.MpidpError, match="before synchronize"):
        with opt.skip_synchronize():
            opt.step()
    opt.step()  # outside: it averages and applies as usual
    opt.close()


def test_set_backward_passes_per_step(rank, size):
    model = build(seed=0)
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.5), model=model)
    opt.set_backward_passes_per_step(3)
    before = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    for k in range(3):
        grads_step(model, rank, k)
        assert all((b.handle is not None) == (k == 2) for b in opt.buckets), k  # only the last pass starts them
    with pytest.raises(mpidp.MpidpError, match="during accumulation"):
        opt.set_backward_passes_per_step(1)
    opt.step()
    summed = [numpy.mean([local_grads(r, passes=3)[i] for r in range(size)], axis=0) for i in range(len(before))]
    for p, b, g in zip(model.parameters(), before, summed):
        numpy.testing.assert_allclose(p.data, b - 0.5 * g, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=">= 1"):
        opt.set_backward_passes_per_step(0)
    opt.set_backward_passes_per_step(1)
    opt.zero_grad()
    grads_step(model, rank)
    assert all(b.handle is not None for b in opt.buckets)
    opt.step()
    opt.close()
