"""N ranks x batch B reach the parameters of 1 process x batch N*B; replicas stay bit-identical."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim

B, D, C, STEPS = 6, 7, 5, 6


class WithSpare(nn.Module):
    """A model with a branch that is never called: its gradients are never produced."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.spare = nn.Linear(3, 3, dtype=numpy.float64)

    def forward(self, x):
        return self.body(x)

    def _backward(self, dy):
        return self.body.backward(dy)


def build(batchnorm=False, seed=0, unused=False, hidden=12):
    layers = [nn.Linear(D, 16, dtype=numpy.float64)]
    if batchnorm:
        layers.append(mpidp.distributed.SyncBatchNorm(16, dtype=numpy.float64) if batchnorm == "sync"
                      else nn.BatchNorm1d(16, dtype=numpy.float64))
    layers += [nn.Tanh(), nn.Linear(16, hidden, dtype=numpy.float64), nn.ReLU(),
               nn.Linear(hidden, C, dtype=numpy.float64)]
    model = WithSpare(nn.Sequential(*layers)) if unused else nn.Sequential(*layers)
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.4
    return model


def batches(size, steps=STEPS, passes=1):
    rng = numpy.random.default_rng(42)
    return [(rng.standard_normal((size * B * passes, D)), rng.integers(0, C, size * B * passes))
            for _ in range(steps)]


def make_opt(kind, params):
    if kind == "sgd":
        return optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return optim.Adam(params, lr=0.01)


def reference(kind, size, batchnorm=False, passes=1, unused=False):
    """One process, the whole global batch, plain optimizer."""
    model = build("local" if batchnorm else False, unused=unused)
    opt = make_opt(kind, model.parameters())
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, passes=passes):
        model.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
    return model


def distributed(kind, rank, size, passes=1, batchnorm=False, **kw):
    model = build("sync" if batchnorm else False, unused=kw.pop("unused", False))
    opt = mpidp.DistributedOptimizer(make_opt(kind, model.parameters()), model=model,
                                     backward_passes_per_step=passes, **kw)
    mpidp.broadcast_parameters(model, root_rank=0)
    mpidp.broadcast_optimizer_state(opt, root_rank=0)
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, passes=passes):
        opt.zero_grad()
        for k in range(passes):
            lo = (rank * passes + k) * B
            loss = crit(model(x[lo:lo + B]), y[lo:lo + B])
            model.backward(crit.backward() / passes)  # the user divides by k for a mean, as in Horovod
            assert numpy.isfinite(loss)
        opt.step()
    return model, opt


def compare(model, ref, atol):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("threshold", [64, 1 << 20])  # many tiny buckets, and one bucket
def test_equivalent_to_one_big_batch(rank, size, kind, overlap, threshold):
    model, opt = distributed(kind, rank, size, overlap=overlap, fusion_threshold_bytes=threshold)
    compare(model, reference(kind, size), 1e-10)
    mpidp.check_replicas(model)
    assert opt.stats["steps"] == STEPS and len(opt.buckets) >= 1


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("threshold", [64, 1 << 20])
@pytest.mark.parametrize("compression", [None, "fp16"])
def test_ring_with_the_average_folded_in(rank, size, kind, threshold, compression, monkeypatch):
    """Every bucket around the ring, which multiplies each part by 1/size as it completes it:
    the same model as one big batch, bitwise the same on every rank."""
    from mpidp.comm import _buffers
    monkeypatch.setattr(_buffers, "RING_FROM", 1)
    extra = {} if compression is None else {"compression": getattr(mpidp.Compression, compression)}
    model, opt = distributed(kind, rank, size, overlap=True, fusion_threshold_bytes=threshold, **extra)
    compare(model, reference(kind, size), 1e-10 if compression is None else 5e-3)
    mpidp.check_replicas(model)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_accumulation(rank, size, kind):
    model, _ = distributed(kind, rank, size, passes=2)
    # rank r's two micro-batches are rows (2r)B..(2r+2)B: together the global batch of 2*size*B
    compare(model, reference(kind, size, passes=2), 1e-10)
    mpidp.check_replicas(model)


def test_no_sync_by_hand(rank, size):
    model = build()
    opt = mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model)
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size, passes=2):
        opt.zero_grad()
        with opt.no_sync():
            lo = rank * 2 * B
            crit(model(x[lo:lo + B]), y[lo:lo + B])
            model.backward(crit.backward() / 2)
        crit(model(x[lo + B:lo + 2 * B]), y[lo + B:lo + 2 * B])
        model.backward(crit.backward() / 2)
        opt.step()
    compare(model, reference("sgd", size, passes=2), 1e-10)


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression(rank, size, compression):
    comp = getattr(mpidp.Compression, compression)
    if comp is None:
        pytest.skip("bf16 needs ml_dtypes")
    model, opt = distributed("sgd", rank, size, compression=comp)
    compare(model, reference("sgd", size), 5e-3 if compression == "fp16" else 3e-2)
    mpidp.check_replicas(model)
    assert all(b.wire.dtype.itemsize == 2 for b in opt.buckets)


def test_sync_batchnorm(rank, size):
    model, _ = distributed("sgd", rank, size, batchnorm=True)
    ref = reference("sgd", size, batchnorm=True)
    compare(model, ref, 1e-10)
    bn, ref_bn = model[1], ref[1]
    numpy.testing.assert_allclose(bn.running_mean, ref_bn.running_mean, atol=1e-10)
    numpy.testing.assert_allclose(bn.running_var, ref_bn.running_var, atol=1e-10)


def test_unused_parameters_never_hang(rank, size):
    model, _ = distributed("adam", rank, size, unused=True)
    compare(model, reference("adam", size, unused=True), 1e-10)


def test_synchronize_then_clip_then_step(rank, size):
    model = build()
    opt = mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model)
    ref = build()
    ref_opt = make_opt("sgd", ref.parameters())
    crit = nn.CrossEntropyLoss()
    for x, y in batches(size):
        opt.zero_grad()
        crit(model(x[rank * B:(rank + 1) * B]), y[rank * B:(rank + 1) * B])
        model.backward(crit.backward())
        opt.synchronize()
        optim.clip_grad_norm(model.parameters(), 0.5)
        opt.step()  # does not average twice
        ref.zero_grad()
        crit(ref(x), y)
        ref.backward(crit.backward())
        optim.clip_grad_norm(ref.parameters(), 0.5)
        ref_opt.step()
    compare(model, ref, 1e-10)


def test_gradients_are_bucket_views(rank, size):
    model = build()
    opt = mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model,
                                     fusion_threshold_bytes=1 << 20)
    for p in model.parameters():
        assert any(p.grad.base is b.flat or p.grad.base is b.flat.base for b in opt.buckets)


@pytest.mark.mpi(min_size=2)
def test_different_model_on_one_rank_raises_everywhere(rank, size):
    model = build(hidden=11 if rank == 1 else 12)  # a different hidden width on rank 1
    opt = mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model)
    crit = nn.CrossEntropyLoss()
    x, y = batches(size)[0]
    crit(model(x[:B]), y[:B])
    with pytest.raises(mpidp.MismatchError, match="parameter '4.weight' differs") as info:
        model.backward(crit.backward())
        opt.step()
    assert "rank 1 has" in str(info.value)
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size  # still usable


def test_bad_arguments():
    model = build()
    with pytest.raises(ValueError, match="op must be"):
        mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model, op=mpidp.Max)
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        mpidp.DistributedOptimizer(make_opt("sgd", model.parameters()), model=model,
                                   backward_passes_per_step=0)
    other = build()
    with pytest.raises(ValueError, match="not among"):
        mpidp.DistributedOptimizer(make_opt("sgd", other.parameters()), model=model)


@pytest.mark.parametrize("first,second", [("distributed", "distributed"), ("distributed", "sharded"),
                                          ("sharded", "distributed")])
def test_a_second_optimizer_on_the_same_parameters_needs_the_first_closed(rank, size, first, second):
    """Both would exchange every gradient at each backward, and the first, never stepped, raised
    'gradient computed again' at the second backward: a clear error instead, until the first is closed."""
    from mpidp import models
    model = models.mlp(in_features=4, hidden=(8,), num_classes=3, seed=0)

    def build(kind):
        inner = optim.SGD(model.parameters(), lr=0.1)
        return (mpidp.DistributedOptimizer(inner, model=model) if kind == "distributed"
                else mpidp.ShardedOptimizer(inner, model=model))
    old = build(first)
    with pytest.raises(mpidp.MpidpError, match="already belongs to an open .*Optimizer: close\\(\\) it"):
        build(second)
    old.close()
    opt = build(second)
    crit = nn.CrossEntropyLoss()
    x, y = numpy.ones((2, 4), numpy.float32) * (rank + 1), numpy.array([0, 1])
    for _ in range(2):
        opt.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
    mpidp.check_replicas(model)
    opt.close()
