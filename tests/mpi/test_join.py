"""mpidp.join(): ranks that run out of data take part in the others' collectives with nothing to give."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim
from mpidp.backend import asnumpy
from mpidp.comm import _buffers

from conftest import data, tol

B, D, C = 4, 7, 5


def steps_of(r, size):
    """Uneven work: rank r runs this many steps before it joins (the most: one rank, not the last)."""
    return 2 + (2 * r) % (size + 1)


def last_of(size):
    counts = [steps_of(r, size) for r in range(size)]
    return max(range(size), key=lambda r: (counts[r], r))


@pytest.mark.parametrize("op", ["Sum", "Average", "Min", "Max", "Product"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "bool"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 700, 257)])  # MPI calls, and the ring where it applies
def test_allreduce_with_joined_ranks(rank, size, op, dtype, shape):
    if op == "Average" and dtype in ("int32", "bool"):
        pytest.skip("no integer or bool average")
    if dtype == "bool" and shape != (7, 5):
        pytest.skip("bool: one shape is enough")
    mine = steps_of(rank, size)
    for step in range(mine):
        x = data(shape, dtype, 100 * rank + step) if op != "Product" else (
            numpy.random.default_rng(100 * rank + step).integers(1, 3, size=shape).astype(dtype))
        inplace = step % 2 == 1
        got = mpidp.allreduce_(x.copy(), op=getattr(mpidp, op), name=f"x{step}") if inplace else \
            mpidp.allreduce(x, op=getattr(mpidp, op), name=f"x{step}")
        them = [r for r in range(size) if steps_of(r, size) > step]
        parts = [(data(shape, dtype, 100 * r + step) if op != "Product" else
                  numpy.random.default_rng(100 * r + step).integers(1, 3, size=shape).astype(dtype)
                  ).astype(numpy.float64) for r in them]
        want = {"Sum": numpy.sum, "Min": numpy.min, "Max": numpy.max, "Product": numpy.prod}.get(
            op, lambda a, axis: numpy.sum(a, axis=axis) / len(them))(numpy.stack(parts), axis=0)
        if dtype == "bool":
            want = want.astype(bool)
        assert got.dtype == numpy.dtype(dtype)
        numpy.testing.assert_allclose(got.astype(numpy.float64), want.astype(numpy.float64),
                                      rtol=tol(dtype), atol=tol(dtype), err_msg=f"step {step}")
    assert mpidp.join() == last_of(size)


def test_ring_average_divides_by_the_ranks_that_contributed(rank, size, monkeypatch):
    """Every part around the ring, the joined ranks' parts too: they scale by 1/contributors."""
    monkeypatch.setattr(_buffers, "RING_FROM", 1)
    last = max(0, size - 2)  # the ranks that join together at the end: the highest of them
    if rank == size - 1 and size > 1:
        assert mpidp.join() == last
        return
    x = data((5, 33), "float64", rank)
    got = mpidp.allreduce(x, name="ring", postscale_factor=3.0)
    contributors = max(1, size - 1)
    want = numpy.sum([data((5, 33), "float64", r) for r in range(contributors)], axis=0) * 3.0 / contributors
    numpy.testing.assert_allclose(got, want, rtol=1e-12)
    grouped = mpidp.grouped_allreduce([x, x[0].astype(numpy.float32)], name="g")
    numpy.testing.assert_allclose(grouped[0], want / 3.0, rtol=1e-12)
    numpy.testing.assert_allclose(grouped[1], want[0] / 3.0, rtol=1e-6)
    assert mpidp.join() == last


def test_other_collectives_with_joined_ranks(xp, rank, size):
    active = [r for r in range(size) if r % 2 == 0]
    if rank % 2 == 1:  # odd ranks have no more data
        assert mpidp.join() == active[-1]
        return
    got = mpidp.allgather(data((rank + 1, 3), "float32", rank, xp), name="ag")
    want = numpy.concatenate([data((r + 1, 3), "float32", r) for r in active])
    numpy.testing.assert_array_equal(asnumpy(got), want)
    got = mpidp.broadcast(data((4, 9), "int64", rank, xp), root_rank=active[-1], name="bc")
    numpy.testing.assert_array_equal(asnumpy(got), data((4, 9), "int64", active[-1]))
    got = mpidp.allreduce(data((6, 5), "float32", rank, xp), name="avg")
    want = numpy.mean([data((6, 5), "float32", r) for r in active], axis=0)
    numpy.testing.assert_allclose(asnumpy(got), want, rtol=1e-6)
    mpidp.barrier()
    assert mpidp.broadcast_object({"from": rank}, root_rank=0) == {"from": 0}
    assert mpidp.allgather_object(rank) == active
    got = mpidp.grouped_allreduce([data((3,), "float32", rank), data((2, 2), "float64", rank)], op=mpidp.Sum)
    numpy.testing.assert_array_equal(got[1], numpy.sum([data((2, 2), "float64", r) for r in active], axis=0))
    assert mpidp.join() == active[-1]


@pytest.mark.parametrize("case", ["broadcast from a joined root", "alltoall", "reducescatter", "mismatch",
                                  "ShardedOptimizer"])
def test_errors_reach_every_rank(rank, size, case):
    if size < (3 if case == "mismatch" else 2):
        pytest.skip("needs a rank that joined and one (two for a mismatch) that did not")
    if case == "ShardedOptimizer":  # a joined rank owns a shard it would never update
        model = build()
        sharded = mpidp.ShardedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model)
    if rank == 1:
        with pytest.raises(mpidp.MpidpError) as err:
            mpidp.join()
    else:
        x = numpy.ones((size, 2), dtype=numpy.float32)
        with pytest.raises(mpidp.MpidpError) as err:
            if case == "broadcast from a joined root":
                mpidp.broadcast(x, root_rank=1, name="b")
            elif case == "alltoall":
                mpidp.alltoall(x, name="a")
            elif case == "reducescatter":
                mpidp.reducescatter(x, name="r")
            elif case == "ShardedOptimizer":
                x, y = shard(rank, 0)
                crit = nn.CrossEntropyLoss()
                crit(model(x), y)
                model.backward(crit.backward())
                sharded.step()
            else:
                mpidp.allreduce(x if rank == 0 else x[:1], name="m")
    if case == "mismatch":
        assert isinstance(err.value, mpidp.MismatchError) and "shape differs" in str(err.value), str(err.value)
    else:
        assert "rank 1 has joined" in str(err.value), str(err.value)
    mpidp.barrier()  # every rank left the failed collective at the same place


def test_join_on_a_process_set(rank, size):
    """The joined rank serves the set's collectives; the job-wide ones and their numbering are untouched."""
    if size < 3:
        pytest.skip("needs a process set of two ranks or more that is not every rank")
    members = list(range(1, size))
    ps = mpidp.add_process_set(members)
    try:
        if rank == 1:
            assert mpidp.join(process_set=ps) == size - 1
        elif rank > 1:
            got = mpidp.allreduce(data((3, 4), "float64", rank), name="set", process_set=ps)
            want = numpy.mean([data((3, 4), "float64", r) for r in members[1:]], axis=0)
            numpy.testing.assert_allclose(got, want, rtol=1e-12)
            assert mpidp.join(process_set=ps) == size - 1
        got = mpidp.allreduce(numpy.full(2, float(rank)), op=mpidp.Sum, name="everyone")
        numpy.testing.assert_array_equal(got, numpy.full(2, float(sum(range(size)))))
    finally:
        mpidp.remove_process_set(ps)


def test_join_needs_the_check(rank, size):
    old = mpidp.comm.set_check(False)
    try:
        with pytest.raises(mpidp.MpidpError, match="cross-rank check"):
            mpidp.join()
    finally:
        mpidp.comm.set_check(old)


def build(seed=0):
    model = nn.Sequential(nn.Linear(D, 16, dtype=numpy.float64), nn.Tanh(), nn.Linear(16, C, dtype=numpy.float64))
    rng = numpy.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.4
    return model


def shard(r, step):
    rng = numpy.random.default_rng(1000 * r + step)
    return rng.standard_normal((B, D)), rng.integers(0, C, B)


def reference(size):
    """One process; each step's batch is the batches of the ranks that still had data at that step."""
    model = build()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    for step in range(max(steps_of(r, size) for r in range(size))):
        them = [shard(r, step) for r in range(size) if steps_of(r, size) > step]
        model.zero_grad()
        crit(model(numpy.concatenate([x for x, _ in them])), numpy.concatenate([y for _, y in them]))
        model.backward(crit.backward())
        opt.step()
    return model


@pytest.mark.parametrize("threshold", [64, 1 << 20])  # many buckets, one bucket
@pytest.mark.parametrize("compression, predivide", [(None, 1.0), ("fp16", 1.0), (None, 4.0)])
@pytest.mark.parametrize("ring", [False, True])
def test_training_with_uneven_shards(rank, size, threshold, compression, predivide, ring, monkeypatch):
    """Horovod's recipe: train on what you have, join, then broadcast from the rank that joined last."""
    if ring:
        monkeypatch.setattr(_buffers, "RING_FROM", 1)
    model = build(seed=rank)  # different starts: the broadcast makes them rank 0's
    extra = {} if compression is None else {"compression": mpidp.Compression.fp16}
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model,
                                     fusion_threshold_bytes=threshold, gradient_predivide_factor=predivide, **extra)
    mpidp.broadcast_parameters(model, root_rank=0)
    crit = nn.CrossEntropyLoss()
    for step in range(steps_of(rank, size)):
        x, y = shard(rank, step)
        opt.zero_grad()
        crit(model(x), y)
        model.backward(crit.backward())
        opt.step()
    last = mpidp.join()
    assert last == last_of(size)
    mpidp.broadcast_parameters(model, root_rank=last)
    mpidp.check_replicas(model)
    for (name, p), q in zip(model.named_parameters(), reference(size).parameters()):
        numpy.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-10 if compression is None else 5e-3,
                                      err_msg=name)


@pytest.mark.parametrize("op", ["average", "Average"])
def test_repeated_average_by_name_divides_by_the_ranks_that_contributed(rank, size, op):
    """A repeated allreduce takes its cached plan; an op given by its name must still divide by the
    ranks that contributed once some have joined (the plan knew only the name)."""
    if rank == size - 1 and size > 1:
        mpidp.allreduce(numpy.full(3, float(rank)), op=op, name="loss")  # step 0: the plan exists everywhere
        mpidp.join()
        return
    got = []
    for step in range(4):
        got.append(mpidp.allreduce(numpy.full(3, float(rank + step)), op=op, name="loss"))
    mpidp.join()
    for step in range(4):
        them = range(size) if step == 0 else range(max(1, size - 1))
        numpy.testing.assert_allclose(got[step], numpy.full(3, sum(r + step for r in them) / len(them)),
                                      err_msg=f"step {step}")


def test_grouped_with_big_tensors_and_joined_ranks(rank, size, monkeypatch):
    """Big tensors of a grouped call are reduced by themselves: a joined rank takes part in each
    of the call's buffers, fused and alone, in the same order."""
    from mpidp.comm import collectives
    monkeypatch.setattr(collectives, "ALONE_BYTES", 64)
    shapes, dtypes = [(40,), (3,), (5, 9), (2,)], ["float32", "float32", "float64", "float64"]
    steps = 1 if rank == size - 1 and size > 1 else 3
    got = []
    for step in range(steps):
        xs = [data(s, d, 50 * rank + 10 * step + i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
        got.append(mpidp.grouped_allreduce_(xs, name=f"gb{step}"))
    mpidp.join()
    for step, out in enumerate(got):
        them = [r for r in range(size) if step == 0 or r != size - 1 or size == 1]
        for i, (s, d) in enumerate(zip(shapes, dtypes)):
            want = sum(data(s, d, 50 * r + 10 * step + i).astype(numpy.float64) for r in them) / len(them)
            numpy.testing.assert_allclose(out[i], want, rtol=tol(d), atol=tol(d), err_msg=f"step {step}, {i}")
