"""Review 6: ranks that must not drift apart (training side), checked against NumPy."""
import numpy
import pytest

import mpidp
from mpidp import amp, nn, optim

D, H, C, B = 5, 7, 3, 4


def build(seed=0, dtype=numpy.float64):
    model = nn.Sequential(nn.Linear(D, H, dtype=dtype), nn.Tanh(), nn.Linear(H, C, dtype=dtype))
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    return model


def local_grads(model, x, y):
    crit = nn.CrossEntropyLoss()
    model.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward())
    return [p.grad.copy() for p in model.parameters()]


def data(r, n=B, seed=11):
    rng = numpy.random.default_rng(seed + r)
    return rng.standard_normal((n, D)), rng.integers(0, C, n)


@pytest.mark.parametrize("op", ["sum", "average"])
@pytest.mark.parametrize("predivide", [1.0, 4.0])
@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_op_and_predivide_against_numpy(rank, size, op, predivide, compression):
    model = build()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=1.0), model=model,
                                     op=mpidp.Sum if op == "sum" else mpidp.Average,
                                     gradient_predivide_factor=predivide,
                                     compression=getattr(mpidp.Compression, compression),
                                     fusion_threshold_bytes=64)
    before = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    x, y = data(rank)
    crit = nn.CrossEntropyLoss()
    crit(model(x), y)
    model.backward(crit.backward())
    opt.step()
    grads = [local_grads(build(), *data(r)) for r in range(size)]
    tol = 1e-12 if compression == "none" else 2e-3
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        total = sum(g[i] for g in grads)
        want = b - (total if op == "sum" else total / size)
        numpy.testing.assert_allclose(p.data, want, rtol=0, atol=tol * max(1, size if op == "sum" else 1))
    mpidp.check_replicas(model)


def one_step(model, opt, rank, seed=11):
    crit = nn.CrossEntropyLoss()
    opt.zero_grad()
    x, y = data(rank, seed=seed)
    crit(model(x), y)
    model.backward(crit.backward())
    opt.step()



def _bn_reference(x, dy, gamma, beta, eps):
    """NumPy BatchNorm over axis 1 of the whole batch: y, dx, dgamma, dbeta."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axes)
    var = x.var(axes)
    inv = 1.0 / numpy.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * inv.reshape(shape)
    y = xhat * gamma.reshape(shape) + beta.reshape(shape)
    dgamma, dbeta = (dy * xhat).sum(axes), dy.sum(axes)
    dx = gamma.reshape(shape) * inv.reshape(shape) / n * (
        n * dy - dbeta.reshape(shape) - xhat * dgamma.reshape(shape))
    return y, dx, dgamma, dbeta, mean, var * n / (n - 1)


@pytest.mark.parametrize("shape", [(3,), (3, 5), (3, 2, 4)])
def test_sync_batchnorm_uneven_batches_match_batchnorm_on_the_whole_batch(rank, size, shape):
    """Rank r holds r + 1 rows (the last, uneven batch): outputs, input gradients, the summed
    weight gradients and the running statistics are those of BatchNorm on all rows at once."""
    counts = [0 if r == 1 else r + 2 for r in range(size)]
    rng = numpy.random.default_rng(5)
    x = rng.standard_normal((sum(counts),) + shape) * 2 + 1
    dy = rng.standard_normal(x.shape)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    bn = mpidp.distributed.SyncBatchNorm(shape[0], dtype=numpy.float64)
    bn.weight.data[...] = rng.standard_normal(shape[0])
    bn.bias.data[...] = rng.standard_normal(shape[0])
    y = bn(x[lo:hi])
    dx = bn.backward(dy[lo:hi])
    want = _bn_reference(x, dy, bn.weight.data, bn.bias.data, bn.eps)
    numpy.testing.assert_allclose(y, want[0][lo:hi], rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(dx, want[1][lo:hi], rtol=0, atol=1e-12)
    grads = mpidp.allreduce(numpy.concatenate([bn.weight.grad, bn.bias.grad]), op=mpidp.Sum)
    numpy.testing.assert_allclose(grads, numpy.concatenate(want[2:4]), rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(bn.running_mean, 0.1 * want[4], rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * want[5], rtol=0, atol=1e-12)


@pytest.mark.parametrize("given", ["distributed", "mixed_precision"])
def test_broadcast_optimizer_state_of_mixed_precision_after_loading_on_the_root(rank, size, given):
    """Horovod's resume: the root loads a checkpoint, then broadcast_optimizer_state. Masters, Adam's
    step and the loss scale must come from the root: a rank that keeps its own loss scale sums
    gradients scaled unlike the others' and unscales them by its own scale, and a step count that
    differs gives another bias correction; the replicas part after the next step."""
    model = build(dtype=numpy.float32)
    mp = amp.MixedPrecision(model, optim.Adam(model.parameters(), lr=0.01), dtype="float16", init_scale=256.0)
    opt = mpidp.DistributedOptimizer(mp, model=model)
    mp.init_state()
    saved = mp.state_dict()  # the checkpoint the root loads (every rank can make it alike)
    for i, entry in saved["state"].items():
        entry.update(step=7, exp_avg=entry["exp_avg"] + 0.01 * (i + 1), exp_avg_sq=entry["exp_avg_sq"] + 1e-4,
                     master=entry["master"] + numpy.float32(0.001))
    saved["loss_scaler"].update(scale=32.0, growth_tracker=5)
    if rank == 0:
        mp.load_state_dict(saved)
    mpidp.broadcast_parameters(model, root_rank=0)
    mpidp.broadcast_optimizer_state(opt if given == "distributed" else mp, root_rank=0)
    got = {i: {k: numpy.copy(v) for k, v in e.items()} for i, e in mp.state_dict()["state"].items()}
    scaler = mp.loss_scale, mp.scaler.growth_tracker
    crit = nn.CrossEntropyLoss()
    for s in range(2):
        opt.zero_grad()
        x, y = data(rank, seed=30 + s)
        crit(model(x.astype(numpy.float16)), y)
        model.backward(crit.backward(mp.loss_scale))
        opt.step()
    same = mpidp.allgather_object([p.data.tobytes() for p in model.parameters()])  # before any rank asserts
    assert all(row == same[0] for row in same), "replicas differ after two steps"
    assert scaler == (32.0, 5)
    for i, entry in saved["state"].items():
        assert got[i]["step"] == 7
        for key in ("exp_avg", "exp_avg_sq", "master"):
            numpy.testing.assert_array_equal(got[i][key], entry[key], err_msg=f"{i} {key}")


def test_broadcast_optimizer_state_gives_a_sharded_mixed_precision_the_roots_loss_scale(rank, size):
    model = build(dtype=numpy.float32)
    mp = amp.MixedPrecision(model, optim.Adam(model.parameters(), lr=0.01), dtype="float16", init_scale=256.0)
    opt = mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=64)
    if rank == 0:
        mp.scaler.load_state_dict({"scale": 32.0, "growth_tracker": 5})
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    assert (mp.loss_scale, mp.scaler.growth_tracker) == (32.0, 5)


@pytest.mark.parametrize("wrap", ["distributed", "sharded1", "sharded2"])
def test_a_backward_between_synchronize_and_step_is_an_error(rank, size, wrap):
    """step() after synchronize() does not average again, so a gradient computed in between was
    applied as this rank's own (while its bucket's reduction could still be writing it): the
    replicas parted silently. It is an error on every rank; zero_grad() recovers."""
    model = build()
    inner = optim.SGD(model.parameters(), lr=0.5)
    opt = (mpidp.DistributedOptimizer(inner, model=model, fusion_threshold_bytes=64) if wrap == "distributed"
           else mpidp.ShardedOptimizer(inner, model=model, stage=int(wrap[-1]), bucket_bytes=64))
    crit = nn.CrossEntropyLoss()
    x, y = data(rank)
    opt.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward())
    opt.synchronize()
    crit(model(x), y)
    with pytest.raises(mpidp.MpidpError, match="after synchronize"):
        model.backward(crit.backward())
    start = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward())
    opt.step()
    grads = [local_grads(build(), *data(r)) for r in range(size)]
    for i, (p, b) in enumerate(zip(model.parameters(), start)):
        want = b - 0.5 * sum(g[i] for g in grads) / size
        numpy.testing.assert_allclose(p.data, want, rtol=0, atol=1e-12)


def test_a_sharded_state_loaded_on_the_root_only_is_refused_by_the_broadcast(rank, size):
    """Horovod's resume (the root loads, then broadcast_optimizer_state) left every other rank's shard
    of a ShardedOptimizer fresh: ShardedOptimizer.load_state_dict keeps only this rank's part and the
    broadcast sends hyperparameters only. The replicas stay equal (the allgather), so nothing showed
    it but Adam's moments and step on 1 - 1/N of the model. The broadcast sees the step counts differ."""
    if size == 1:
        pytest.skip("needs ranks that differ")
    model = build()
    opt = mpidp.ShardedOptimizer(optim.Adam(model.parameters(), lr=0.01), model=model, bucket_bytes=64)
    for s in range(2):
        one_step(model, opt, rank, seed=40 + s)
    saved = opt.state_dict()  # gathered: a collective
    fresh_model = build()
    fresh = mpidp.ShardedOptimizer(optim.Adam(fresh_model.parameters(), lr=0.01), model=fresh_model, bucket_bytes=64)
    if rank == 0:
        fresh.load_state_dict(saved)
    with pytest.raises(mpidp.MismatchError, match="load_state_dict"):
        mpidp.broadcast_optimizer_state(fresh, root_rank=0)
    fresh.load_state_dict(saved)  # every rank: the way that works
    mpidp.broadcast_optimizer_state(fresh, root_rank=0)


@pytest.mark.parametrize("wrap", ["distributed", "sharded"])
def test_unfreezing_a_parameter_frozen_when_the_optimizer_was_built_is_an_error(rank, size, wrap):
    """Gradual unfreezing: the first layer is frozen when the optimizer is built and trainable later.
    Its gradients are in no bucket: a DistributedOptimizer's inner optimizer applied each rank's own
    (the replicas parted), a ShardedOptimizer never updated it. An error on every rank instead."""
    model = build()
    first = list(model.parameters())[:2]
    for p in first:
        p.requires_grad = False
    inner = optim.SGD(model.parameters(), lr=0.5)
    opt = (mpidp.DistributedOptimizer(inner, model=model, fusion_threshold_bytes=64) if wrap == "distributed"
           else mpidp.ShardedOptimizer(inner, model=model, bucket_bytes=64))
    one_step(model, opt, rank)
    for p in first:
        p.requires_grad = True
    with pytest.raises(mpidp.MpidpError, match="'0.weight' was frozen .* when the .* was built"):
        one_step(model, opt, rank, seed=50)
    for p in first:
        p.requires_grad = False
    opt.zero_grad()  # as built again: it trains on
    one_step(model, opt, rank, seed=51)
    mpidp.check_replicas(model)


def test_freezing_a_parameter_of_a_sharded_optimizer_is_an_error(rank, size):
    """A frozen parameter keeps its value under a plain optimizer (it is skipped); a ShardedOptimizer
    still stepped its shard, so momentum and weight decay moved it: sharded differed from unsharded."""
    model = build()
    opt = mpidp.ShardedOptimizer(optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01),
                                 model=model, bucket_bytes=64)
    one_step(model, opt, rank)
    first = list(model.parameters())[0]
    first.requires_grad = False
    with pytest.raises(mpidp.MpidpError, match="'0.weight' was trainable when the ShardedOptimizer was built"):
        one_step(model, opt, rank, seed=60)
    opt.zero_grad()  # waits for the reductions the backward started


@pytest.mark.parametrize("overlap", [True, False])
def test_a_gradient_replaced_between_backward_and_step_is_an_error(rank, size, overlap):
    """``p.grad = numpy.clip(p.grad, ...)`` after backward: the average arrived in the bucket's view
    while step() applied the new array, this rank's own clipped gradient (the replicas parted).
    An error on every rank; after synchronize() (Horovod's clipping) a new array is fine."""
    model = build()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.5), model=model, overlap=overlap)
    crit = nn.CrossEntropyLoss()
    x, y = data(rank)
    opt.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward())
    for p in model.parameters():
        p.grad = numpy.clip(p.grad, -0.05, 0.05)
    with pytest.raises(mpidp.MpidpError, match="'2.bias' was replaced"):
        opt.step()
    start = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward())
    opt.synchronize()
    for p in model.parameters():
        p.grad = numpy.clip(p.grad, -0.05, 0.05)
    with opt.skip_synchronize():
        opt.step()
    grads = [local_grads(build(), *data(r)) for r in range(size)]
    for i, (p, b) in enumerate(zip(model.parameters(), start)):
        want = b - 0.5 * numpy.clip(sum(g[i] for g in grads) / size, -0.05, 0.05)
        numpy.testing.assert_allclose(p.data, want, rtol=0, atol=1e-12)


def test_sharded_mixed_precision_follows_parameters_broadcast_after_the_optimizer_state(rank, size):
    if size == 1:
        pytest.xfail("needs ranks that start apart")
    model = build(seed=rank, dtype=numpy.float32)  # ranks start apart
    mp = amp.MixedPrecision(model, optim.SGD(model.parameters(), lr=0.0), dtype="float16", init_scale=8.0)
    opt = mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=64)
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    mpidp.broadcast_parameters(model, root_rank=0)
    start = [p.data.copy() for p in model.parameters()]
    crit = nn.CrossEntropyLoss()
    opt.zero_grad()
    x, y = data(rank)
    crit(model(x.astype(numpy.float16)), y)
    model.backward(crit.backward(mp.loss_scale))
    opt.step()  # lr=0: the model must stay the root's
    for (name, p), a in zip(model.named_parameters(), start):
        numpy.testing.assert_array_equal(p.data, a, err_msg=name)


class Branchy(nn.Module):
    """body, plus ``extra`` on the ranks whose data asks for it (a data-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.body = build()
        self.extra = nn.Linear(C, C, dtype=numpy.float64)
        rng = numpy.random.default_rng(9)
        for p in self.extra.parameters():
            p.data[...] = rng.standard_normal(p.shape) * 0.3
        self.use_extra = False

    def forward(self, x):
        y = self.body(x)
        self._save(self.use_extra)
        return self.extra(y) if self.use_extra else y

    def _backward(self, dy):
        (used,) = self._pop()
        return self.body.backward(self.extra.backward(dy) if used else dy)


@pytest.mark.parametrize("passes", [1, 2])
def test_a_branch_used_on_some_ranks_only(rank, size, passes):
    """Rank 0 alone runs ``extra`` (in the last pass): its bucket completes there during backward and
    elsewhere only at synchronize(); the average is still each rank's gradient (zero where unused)."""
    def run(model, r, opt=None):
        crit = nn.CrossEntropyLoss()
        for k in range(passes):
            model.use_extra = r == 0 and k == passes - 1
            x, y = data(r, seed=70 + k)
            crit(model(x), y)
            model.backward(crit.backward())

    model = Branchy()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.5), model=model, fusion_threshold_bytes=64,
                                     backward_passes_per_step=passes)
    start = [p.data.copy() for p in model.parameters()]
    opt.zero_grad()
    run(model, rank)
    opt.step()
    grads = []
    for r in range(size):
        ref = Branchy()
        ref.zero_grad()
        run(ref, r)
        grads.append([p.grad.copy() for p in ref.parameters()])
    for i, ((name, p), b) in enumerate(zip(model.named_parameters(), start)):
        numpy.testing.assert_allclose(p.data, b - 0.5 * sum(g[i] for g in grads) / size, rtol=0, atol=1e-12,
                                      err_msg=name)
    mpidp.check_replicas(model)


def test_step_without_backward_and_synchronize_twice(rank, size):
    """A step with no backward since zero_grad() averages zeros (SGD with momentum still moves, the
    same on every rank); a second synchronize() is a no-op."""
    model = build()
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model=model,
                                     fusion_threshold_bytes=64)
    one_step(model, opt, rank)
    opt.zero_grad()
    opt.synchronize()
    opt.synchronize()
    opt.step()
    opt.step()  # no zero_grad, no backward: the same averaged zeros again
    mpidp.check_replicas(model)
    ref = build()
    ref_opt = optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    ref.zero_grad()
    grads = [local_grads(build(), *data(r)) for r in range(size)]
    for p, *gs in zip(ref.parameters(), *grads):
        p.grad[...] = sum(gs) / size
    ref_opt.step()
    ref.zero_grad()
    ref_opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("wrap", ["distributed", "sharded"])
def test_a_loss_scale_that_differs_between_ranks_is_an_error(rank, size, wrap):
    """A rank whose loss scale differs (its checkpoint, a scale set by hand) sums gradients scaled
    unlike the others' and unscales by its own: the update is wrong on every rank and the replicas
    part. The overflow exchange every step already makes sees it: MismatchError on every rank."""
    if size == 1:
        pytest.skip("needs ranks that differ")
    model = build(dtype=numpy.float32)
    mp = amp.MixedPrecision(model, optim.SGD(model.parameters(), lr=0.1), dtype="float16", init_scale=256.0)
    opt = (mpidp.DistributedOptimizer(mp, model=model) if wrap == "distributed"
           else mpidp.ShardedOptimizer(mp, model=model, bucket_bytes=64))
    if rank == size - 1:
        mp.scaler.scale = 64.0
    crit = nn.CrossEntropyLoss()
    opt.zero_grad()
    x, y = data(rank)
    crit(model(x.astype(numpy.float16)), y)
    model.backward(crit.backward(mp.loss_scale))
    with pytest.raises(mpidp.MismatchError, match="loss scale"):
        opt.step()
