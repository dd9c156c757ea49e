"""The optimizers' plan check: every setting a rank can vary is compared, and it runs in the engine's order."""
import numpy
import pytest

import mpidp
from mpidp import nn, optim
from mpidp.comm import stall
from mpidp.comm.engine import engine


def model_and_loss(rank):
    model = nn.Sequential(nn.Linear(5, 8, dtype=numpy.float32), nn.Tanh(), nn.Linear(8, 3, dtype=numpy.float32))
    # the layers draw from the global RNG, whose state earlier tests may leave different on each rank
    mpidp.broadcast_parameters(model, root_rank=0)
    rng = numpy.random.default_rng(rank)
    x, t = rng.standard_normal((4, 5)).astype(numpy.float32), rng.standard_normal((4, 3)).astype(numpy.float32)
    return model, lambda: model.backward(model(x) - t)


DIFFER = {  # setting -> (rank 0's value, the other ranks' value)
    "op": (mpidp.Average, mpidp.Sum),
    "gradient_predivide_factor": (1.0, 2.0),
    "compression": (mpidp.Compression.none, mpidp.Compression.fp16),
    "backward_passes_per_step": (1, 2),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("field", sorted(DIFFER))
def test_distributed_optimizer_setting_differs(rank, size, field):
    model, backward = model_and_loss(rank)
    value = DIFFER[field][rank != 0]
    opt = mpidp.DistributedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model, **{field: value})
    with pytest.raises(mpidp.MismatchError, match=f"{field} differs") as info:
        for _ in range(opt.backward_passes_per_step):
            backward()
        opt.step()
    assert info.value.field == field
    assert "rank 0 has" in str(info.value) and info.value.ranks[0] != info.value.ranks[1]
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size  # still usable


@pytest.mark.mpi(min_size=2)
def test_sharded_optimizer_accumulation_differs(rank, size):
    model, backward = model_and_loss(rank)
    passes = 2 if rank == 1 else 1
    opt = mpidp.ShardedOptimizer(optim.SGD(model.parameters(), lr=0.1), model=model,
                                 backward_passes_per_step=passes)
    with pytest.raises(mpidp.MismatchError, match="backward_passes_per_step differs"):
        for _ in range(passes):
            backward()
        opt.step()
    assert mpidp.allreduce(numpy.ones(1), op=mpidp.Sum)[0] == size


def _delay_engine_on_rank_1(rank):
    """Queue a job that holds the engine back on rank 1 only (a test-only delay): rank 0 then starts the
    queued metric allreduce while rank 1 is still free to issue the plan check first."""
    seq = stall.started()
    engine.submit(lambda: __import__("time").sleep(0.3 if rank == 1 else 0.0), "test delay", seq)


@pytest.mark.parametrize("kind", ["distributed", "sharded"])
def test_plan_check_waits_for_queued_collectives(rank, size, kind):
    """An async metric allreduce queued before the first step: the plan check runs behind it, in the
    same order on every rank (no hang, no bogus MismatchError, the metric right)."""
    for attempt in range(3):
        model, backward = model_and_loss(rank)
        wrap = mpidp.DistributedOptimizer if kind == "distributed" else mpidp.ShardedOptimizer
        opt = wrap(optim.SGD(model.parameters(), lr=0.1), model=model)
        metric = numpy.array([rank + 1, 7], dtype=numpy.int64)  # the check's own shape, dtype and op
        _delay_engine_on_rank_1(rank)
        handle = mpidp.allreduce_async(metric, op=mpidp.Min, name=f"metric.{attempt}")
        backward()
        opt.step()
        numpy.testing.assert_array_equal(handle.wait(), [1, 7])
        mpidp.check_replicas(model)
        opt.close()
